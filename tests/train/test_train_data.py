"""Input side of training: the embedded TFDS builders, the grain pipelines, augmentation."""
from __future__ import annotations

import functools
import itertools

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxattn.configs import base
from jaxattn.train import augment, input_pipeline
from jaxattn.train.datasets.stdlib_bytes import stdlib_bytes


def _config(tfds_dir, **overrides):
    c = base.get_config()
    c.data_dir = tfds_dir
    c.image_size = 16
    c.update(overrides)
    return c


def test_digits_split_is_fixed_and_disjoint(tfds_dir):
    c = _config(tfds_dir)
    train, test = input_pipeline.open_split(c, "train"), input_pipeline.open_split(c, "test")
    assert (len(train), len(test)) == (1437, 360)
    example = train[0]
    assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
    assert example["image"].max() > 200  # rescaled from 0..16
    from sklearn.datasets import load_digits
    raw = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    keys = {r.tobytes() for r in raw}
    seen_train = {train[i]["image"][..., 0].tobytes() for i in range(len(train))}
    seen_test = {test[i]["image"][..., 0].tobytes() for i in range(len(test))}
    assert seen_train <= keys and seen_test <= keys
    assert np.bincount([int(test[i]["label"]) for i in range(len(test))], minlength=10).min() > 20
    assert input_pipeline.num_classes(c) == 10


def test_stdlib_held_out_modules(tfds_dir):
    c = _config(tfds_dir, dataset="stdlib_bytes")
    train, test = input_pipeline.open_split(c, "train"), input_pipeline.open_split(c, "test")
    top = lambda src: {src[i]["path"].decode().split("/")[0].removesuffix(".py") for i in range(len(src))}
    assert top(test) == set(stdlib_bytes.HELD_OUT_MODULES)
    assert not top(train) & set(stdlib_bytes.HELD_OUT_MODULES)
    paths = [train[i]["path"].decode() for i in range(len(train))]
    assert "os.py" in paths and not any("/test/" in p or p.startswith("test/") for p in paths)
    corpus = input_pipeline.load_corpus(test)
    assert 200_000 < len(corpus) < 2_000_000 and corpus.max() == input_pipeline.EOS
    assert (corpus == input_pipeline.EOS).sum() == len(test) and corpus[-1] == input_pipeline.EOS


def _batches(ds, n):
    return [jax.tree.map(np.asarray, b) for b in itertools.islice(iter(ds), n)]


@pytest.mark.parametrize("processes", [2, 4])
def test_process_rows_assemble_the_global_batch(processes):
    source = list(range(103))
    kw = dict(seed=3, global_batch=8)
    whole = _batches(input_pipeline.train_dataset(source, None, process_index=0, process_count=1, **kw), 30)
    parts = [_batches(input_pipeline.train_dataset(source, None, process_index=p, process_count=processes, **kw), 30)
             for p in range(processes)]
    for b, batch in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([parts[p][b] for p in range(processes)]), batch)
    # Epochs are complete permutations, each shuffled differently.
    stream = np.concatenate(whole)[:206]
    assert sorted(stream[:103]) == source and sorted(stream[103:]) == source
    assert not np.array_equal(stream[:103], stream[103:])


def test_train_iterator_state_resumes_exactly(tfds_dir):
    c = _config(tfds_dir, data_threads=2)
    c.input.randaugment_ops = 2
    source = input_pipeline.open_split(c, "train")
    prep = input_pipeline.vision_preprocess(c, train=True)
    make = lambda: input_pipeline.to_iterator(input_pipeline.train_dataset(
        source, prep, seed=0, global_batch=16, process_index=0, process_count=1), c)
    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    assert expected[0]["image"].shape == (16, 16, 16, 3) and expected[0]["image"].dtype == np.uint8


def test_eval_dataset_counts_every_example_once():
    source = [{"x": np.asarray(i)} for i in range(10)]
    seen = []
    for p in range(2):
        for batch in input_pipeline.eval_dataset(source, None, global_batch=4, process_index=p, process_count=2):
            seen += [int(x) for x, m in zip(batch["x"], batch["mask"]) if m]
            assert batch["x"].shape == (2,)
    assert sorted(seen) == list(range(10))
    capped = list(input_pipeline.eval_dataset(source, None, global_batch=4, process_index=0, process_count=1,
                                              max_examples=5))
    assert [int(m) for b in capped for m in b["mask"]] == [1] * 5 + [0] * 3


def test_byte_vocabulary_matches_the_language_models():
    lm = pytest.importorskip("jaxattn.models.lm")
    assert input_pipeline.BYTE_VOCAB_SIZE == lm.BYTE_VOCAB_SIZE


def test_token_windows_predict_each_byte_once():
    tokens = np.arange(23, dtype=np.uint8)
    windows = input_pipeline.TokenWindows(tokens, 5)
    assert len(windows) == 4
    np.testing.assert_array_equal(windows[1]["inputs"], [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(windows[1]["targets"], [6, 7, 8, 9, 10])
    targets = np.concatenate([windows[i]["targets"] for i in range(len(windows))])
    np.testing.assert_array_equal(targets, np.arange(1, 21))
    with pytest.raises(ValueError, match="seq_len"):
        input_pipeline.TokenWindows(tokens, 23)


def test_missing_dataset_is_a_clear_error(tmp_path):
    c = _config(str(tmp_path), dataset="cifar10")
    with pytest.raises(FileNotFoundError, match=r"not prepared.*tfds build cifar10"):
        input_pipeline.open_split(c, "train")


def test_published_datasets_read_through_the_same_path(tmp_path):
    import tensorflow_datasets as tfds
    c = _config(str(tmp_path), dataset="imagenet2012", image_size=24)
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        source = input_pipeline.open_split(c, "validation")
        assert input_pipeline.num_classes(c) == 1000
    example = input_pipeline.vision_preprocess(c, train=False)(source[0])
    assert example["image"].shape == (24, 24, 3)


# ---- augmentation ----

@pytest.mark.parametrize("shape", [(8, 8, 1), (37, 20, 3), (5, 64, 3)])
def test_crops_give_the_requested_size(shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    for _ in range(5):
        out = augment.random_resized_crop(image, rng, 12, scale=(0.08, 1.0))
        assert out.shape == (12, 12, shape[-1]) and out.dtype == np.uint8
    assert augment.center_crop(image, 12).shape == (12, 12, shape[-1])
    np.testing.assert_array_equal(augment.random_resized_crop(image, np.random.default_rng(1), 12),
                                  augment.random_resized_crop(image, np.random.default_rng(1), 12))


def test_center_crop_of_the_full_image_is_identity():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(augment.center_crop(image, 16, crop_pct=1.0), image)


@pytest.mark.parametrize("op", augment.RAND_AUGMENT_OPS)
def test_rand_augment_ops(op):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    out = augment.rand_augment(image, rng, num_ops=1, magnitude=15, ops=(op,))
    assert out.shape == image.shape and out.dtype == np.uint8
    if op not in ("AutoContrast", "Equalize"):  # identity-capable only by chance on random noise
        assert not np.array_equal(out, image)
    assert augment.rand_augment(image, rng, num_ops=0) is image


def test_label_smoothing():
    targets = augment.smooth_labels(jnp.array([0, 3]), 4, 0.1)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)


def test_mixup_cutmix_mixes_images_and_targets_alike():
    b, h, w, k = 4, 16, 16, 5
    images = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, h, w, 3))
    targets = jax.nn.one_hot(jnp.arange(b) % k, k)
    mix = jax.jit(functools.partial(augment.mixup_cutmix, mixup_alpha=0.8, cutmix_alpha=1.0))
    kinds = set()
    for seed in range(8):
        out, mixed = mix(jax.random.key(seed), images, targets)
        np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-5)
        lam = float(mixed[0, 0])  # example 0 (class 0) mixed with example 3 (class 3)
        # Pixel mass from example 0 equals lam, whether blended (mixup) or pasted (cutmix).
        share = float(jnp.mean((images[-1, ..., 0] - out[0, ..., 0]) / (images[-1, ..., 0] - images[0, ..., 0])))
        np.testing.assert_allclose(share, lam, atol=1e-5)
        kinds.add("cutmix" if set(np.unique(np.asarray(out[0]))) <= {0.0, 3.0} else "mixup")
    assert kinds == {"cutmix", "mixup"}
    same, same_t = augment.mixup_cutmix(jax.random.key(0), images, targets)
    assert same is images and same_t is targets


def test_vision_preprocess_follows_config(tfds_dir):
    c = _config(tfds_dir)
    c.input = ml_collections.ConfigDict({**c.input.to_dict(), "channels": 3})
    source = input_pipeline.open_split(c, "test")
    out = input_pipeline.vision_preprocess(c, train=True)(source[0], np.random.default_rng(0))
    assert out["image"].shape == (16, 16, 3) and out["label"].dtype == np.int32
    ev = input_pipeline.vision_preprocess(c, train=False)(source[0])
    np.testing.assert_array_equal(ev["image"][..., 0], ev["image"][..., 2])  # gray repeated to RGB


def test_grain_map_dataset_subclass_slices():
    ds = input_pipeline.ProcessRows(grain.MapDataset.range(12), 4, 1, 2)
    assert len(ds) == 6 and [ds[i] for i in range(6)] == [2, 3, 6, 7, 10, 11]


def test_runs_preparing_the_same_embedded_dataset_at_once_both_succeed(tmp_path):
    """Two runs started together on one `data_dir`: TFDS builds each in a temporary folder and the second rename
    fails; `prepare` must then take the finished copy instead of crashing the run."""
    from concurrent.futures import ThreadPoolExecutor

    from jaxattn.train import datasets
    with ThreadPoolExecutor(2) as pool:
        builders = list(pool.map(lambda _: datasets.prepare("digits", str(tmp_path)), range(2)))
    assert all(b.is_prepared() for b in builders)
    assert len(builders[0].as_data_source("test")) == 360
