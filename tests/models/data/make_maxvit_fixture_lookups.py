"""Recreates the hidden one-hot lookups of `maxvit_reduced_timm.npz` -> `maxvit_reduced_timm_lookups.npz`.

Why: timm's `RelPosBiasTf` expands each bias table with two one-hot lookup tensors, `height_lookup` and
`width_lookup` (`[p, p, 2p-1]`), kept as *non-persistent* buffers. The fixture generator perturbed every parameter
and buffer, these included, but the state dict does not save them, so the fixture logits belong to a model whose
bias expansion is `sum_hw table[n,h,w] (onehot + noise)[i,x,h] (onehot + noise)[j,y,w]`. That costs 1.73e-4 of
logit agreement for any faithful port (ours and timm itself, unperturbed, agree to ~1e-6).

The generator's noise is reproducible: one `torch.Generator` seeded with 1 walks `named_parameters()` then
`named_buffers()` of the timm model, adding `0.05 * randn` to each tensor and drawing BatchNorm running variances
as `rand + 0.5`. This script replays that walk from the state dict's key order (which is the module order), checks
the replay against every BatchNorm running mean/variance stored in the fixture, and saves the perturbed lookups.

    python tests/models/data/make_maxvit_fixture_lookups.py     # needs torch (not a test dependency)
"""
import pathlib

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
FIXTURE = HERE.parents[2].parent / "shared" / "fixtures" / "maxvit_reduced_timm.npz"
TABLE = ".relative_position_bias_table"
BN_BUFFERS = (".running_mean", ".running_var", ".num_batches_tracked")


def one_hot_lookup(p: int) -> np.ndarray:
    out = np.zeros((p, p, 2 * p - 1), np.float32)
    for i in range(p):
        for x in range(p):
            out[i, x, x - i + p - 1] = 1.0
    return out


def main():
    z = np.load(FIXTURE)
    sd = {k[3:]: z[k] for k in z.files if k.startswith("sd/")}
    params = [(k, v.shape) for k, v in sd.items() if not k.endswith(BN_BUFFERS)]
    buffers = []
    for k, v in sd.items():
        if k.endswith(BN_BUFFERS):
            buffers.append((k, v.shape))
        elif k.endswith(TABLE):
            p = (v.shape[1] + 1) // 2
            module = k[: -len(TABLE)]
            buffers += [(f"{module}.height_lookup", (p, p, 2 * p - 1)), (f"{module}.width_lookup", (p, p, 2 * p - 1))]
    gen = torch.Generator().manual_seed(1)
    out, checked = {}, 0
    for k, shape in params + buffers:
        if k.endswith(".num_batches_tracked"):
            continue
        if k.endswith(".running_var"):
            value = (torch.rand(shape, generator=gen) + 0.5).numpy()
        else:
            value = (torch.randn(shape, generator=gen) * 0.05).numpy()
        if k.endswith((".running_mean", ".running_var")):
            np.testing.assert_allclose(value, sd[k], atol=1e-7, rtol=0, err_msg=k)
            checked += 1
        elif k.endswith("_lookup"):
            out[k] = one_hot_lookup(shape[0]) + value
    np.savez_compressed(HERE / "maxvit_reduced_timm_lookups.npz", **out)
    print(f"replay matches {checked} BatchNorm statistics; saved {len(out)} lookups")


if __name__ == "__main__":
    main()
