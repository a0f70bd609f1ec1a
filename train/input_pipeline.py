"""Input pipelines: grain over `tfds.data_source`, for the embedded and the published TFDS datasets alike.

Determinism and sharding. The training stream is a pure function of the seed: the split is shuffled per epoch
(grain's index shuffle), repeated forever, and each example is preprocessed with a generator seeded by its position
in that global stream. Global batch `b` is positions `[b * B, (b + 1) * B)`; process `p` of `P` reads rows
`[p * B / P, (p + 1) * B / P)` of it, the rows its devices hold in the global array. So any number of processes
sees the same global batches in the same layout, and the iterator's state is just a position (checkpointed).

Evaluation reads the whole held-out split once, padded to a multiple of the global batch with examples whose
`mask` is 0, so that every example counts exactly once.
"""
from __future__ import annotations

import os

import grain
import jax
import numpy as np

from . import augment, datasets


def resolve_data_dir(config) -> str:
    return os.path.expanduser(config.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def open_split(config, split: str):
    """A random-access source of `split` of `config.dataset`; embedded datasets are built on first use."""
    import tensorflow_datasets as tfds
    data_dir = resolve_data_dir(config)
    if config.dataset in datasets.EMBEDDED:
        builder = _prepare_embedded(config.dataset, data_dir)
        return builder.as_data_source(split)
    try:
        return tfds.data_source(config.dataset, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - TFDS raises many types for "not there"; all mean the same to a user
        raise FileNotFoundError(
            f"dataset {config.dataset!r} (split {split!r}) is not prepared in `data_dir` {data_dir!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Nothing is downloaded at run time: "
            f"prepare it once in the ArrayRecord format on a machine with network (and TensorFlow), e.g. "
            f"`tfds build {config.dataset} --data_dir={data_dir} --file_format=array_record` (imagenet2012 needs "
            f"its manual download in {data_dir}/downloads/manual), then pass `--config.data_dir={data_dir}`."
        ) from e


def _prepare_embedded(name: str, data_dir: str):
    if jax.process_index() == 0:
        datasets.prepare(name, data_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"prepare {name}")
    return datasets.prepare(name, data_dir)  # a no-op unless this host has its own disk


def num_classes(config, source=None) -> int:
    """The label count of a classification dataset, from its TFDS features."""
    import tensorflow_datasets as tfds
    if config.dataset in datasets.EMBEDDED:
        info = datasets.builder_class(config.dataset)(data_dir=resolve_data_dir(config)).info
    else:
        info = tfds.builder(config.dataset, data_dir=resolve_data_dir(config)).info
    return info.features[config.input.label_key].num_classes


class ProcessRows(grain.MapDataset):
    """This process's rows of consecutive global batches: local position `i` is global position
    `(i // local) * global + process_index * local + i % local`."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self._global, self._local = global_batch, global_batch // process_count
        self._offset = process_index * self._local
        self._length = len(parent) // global_batch * self._local

    def __len__(self):
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local)
        return self._parent[batch * self._global + self._offset + row]


def train_dataset(source, preprocess, *, seed: int, global_batch: int, process_index: int, process_count: int):
    """Local batches of the endless shuffled stream; `preprocess(example, rng) -> example` (or None)."""
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    if preprocess is not None:
        ds = ds.random_map(preprocess)
    return ProcessRows(ds, global_batch, process_index, process_count).batch(global_batch // process_count,
                                                                            drop_remainder=True)


def eval_dataset(source, preprocess, *, global_batch: int, process_index: int, process_count: int,
                 max_examples: int = 0):
    """Local batches covering the first `max_examples` (0: all) examples once, padded with `mask` = 0."""
    n = len(source) if max_examples <= 0 else min(len(source), max_examples)
    padded = -(-n // global_batch) * global_batch
    preprocess = preprocess or (lambda example: example)
    blank = jax.tree.map(np.zeros_like, preprocess(source[0]))

    def load(i):
        example = preprocess(source[i]) if i < n else blank
        return {**example, "mask": np.asarray(i < n, np.int32)}

    ds = grain.MapDataset.range(padded).map(load)
    return ProcessRows(ds, global_batch, process_index, process_count).batch(global_batch // process_count)


def to_iterator(ds: grain.MapDataset, config):
    """A checkpointable iterator reading with threads (and worker processes if `config.data_workers > 0`)."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.data_threads,
                                              prefetch_buffer_size=config.prefetch_batches * 4))
    if config.data_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data_workers))
    return iter(it)


# ---- vision ----

def vision_preprocess(config, *, train: bool):
    """`(example, rng) -> {'image': uint8 [S, S, C], 'label': int32}` following `config.input`."""
    inp, size = config.input, config.image_size

    def fn(example, rng=None):
        image = augment.to_channels(np.asarray(example[inp.image_key]), inp.channels)
        if train:
            image = augment.random_resized_crop(image, rng, size, scale=tuple(inp.crop_scale),
                                                ratio=tuple(inp.crop_ratio))
            if inp.flip:
                image = augment.random_flip(image, rng)
            if inp.randaugment_ops > 0:
                image = augment.to_channels(augment.rand_augment(
                    image, rng, num_ops=inp.randaugment_ops, magnitude=inp.randaugment_magnitude), inp.channels)
        else:
            image = augment.center_crop(image, size, crop_pct=inp.crop_pct)
        return {"image": np.ascontiguousarray(image), "label": np.asarray(example[inp.label_key], np.int32)}

    return fn


# ---- byte-level language modelling ----

# Token ids: bytes 0-255, then the specials of the LM family's byte vocabulary (pad 256, bos 257, eos 258, sep 259).
BYTE_VOCAB_SIZE = 260
EOS = 258  # ends each document


def document_tokens(doc, text_key: str = "bytes") -> np.ndarray:
    """One document's bytes as uint16 tokens, from a uint8 tensor feature or a (UTF-8) text feature."""
    value = doc[text_key]
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, bytes):
        value = np.frombuffer(value, np.uint8)
    return np.asarray(value, np.uint16)


def load_corpus(source, text_key: str = "bytes") -> np.ndarray:
    """All documents of a split as one token array (uint16), each followed by `EOS`: in path order where the
    dataset has a `path` feature (the embedded stdlib corpus), else in the split's order. For held-out splits and
    small corpora; large training splits go through `PackedDocuments`."""
    docs = [source[i] for i in range(len(source))]
    if docs and "path" in docs[0]:
        docs.sort(key=lambda d: d["path"])
    parts = []
    for doc in docs:
        parts += [document_tokens(doc, text_key), np.asarray([EOS], np.uint16)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.uint16)


def document_segments(inputs: np.ndarray) -> np.ndarray:
    """Segment ids `[T]` (int32) of a packed window of input tokens: the count of `EOS` tokens up to and including
    each position, so an `EOS` opens the next document (it is that document's first input, from which its first
    byte is predicted) and the bytes after it never see the previous document."""
    return np.cumsum(np.asarray(inputs) == EOS, dtype=np.int32)


def _window(window: np.ndarray, segments: bool) -> dict:
    """`{'inputs', 'targets'}` of a `seq_len + 1` token window, plus `'segment_ids'` when `segments`."""
    example = {"inputs": window[:-1], "targets": window[1:]}
    if segments:
        example["segment_ids"] = document_segments(example["inputs"])
    return example


class PackedDocuments:
    """Training windows over a corpus too large to hold in memory (a published TFDS text dataset): item `i` packs
    documents `i, i+1, ...` (each followed by `EOS`, wrapping round the split) until `seq_len + 1` tokens, read by
    random access. One window per document, so an epoch starts a window at every document once. With `segments`
    (`config.pack_documents`) each window also has `segment_ids` (`document_segments`)."""

    def __init__(self, source, seq_len: int, text_key: str, segments: bool = False):
        if len(source) == 0:
            raise ValueError("the training split has no documents")
        self.source, self.seq_len, self.text_key, self.segments = source, seq_len, text_key, bool(segments)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        need, parts, j = self.seq_len + 1, [], int(i)
        while need > 0:
            doc = np.append(document_tokens(self.source[j % len(self.source)], self.text_key), EOS)[:need]
            parts.append(doc)
            need -= len(doc)
            j += 1
        return _window(np.concatenate(parts).astype(np.int32), self.segments)


class TokenWindows:
    """Random-access non-overlapping windows: item `i` is `inputs = tokens[i*T : (i+1)*T]` and the next bytes as
    `targets`, so that every byte after the first is predicted exactly once per pass. With `segments`
    (`config.pack_documents`) each window also has `segment_ids` (`document_segments`)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, segments: bool = False):
        if len(tokens) <= seq_len:
            raise ValueError(f"corpus of {len(tokens)} bytes is too short for `seq_len` {seq_len}")
        self.tokens, self.seq_len, self.segments = tokens, seq_len, bool(segments)

    def __len__(self):
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i):
        start = int(i) * self.seq_len
        return _window(self.tokens[start:start + self.seq_len + 1].astype(np.int32), self.segments)
