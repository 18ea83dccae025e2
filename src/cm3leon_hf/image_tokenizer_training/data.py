"""The VQ's training and eval images: any `datasets` image column, local or on the Hub, map-style or streamed, read in
an order that a saved position replays (`--resume`), with the synthetic world's free-form drawings mixed in."""

from pathlib import Path


def load_splits(args):
    """The train and eval datasets (map-style, or iterable with --streaming)."""
    import datasets

    if args.dataset is None:
        from ..synthetic import build_tasks

        world = build_tasks(
            num_train=args.synthetic_rows,
            num_validation=max(1, args.eval_images // 7 + 1),
            num_test=0,
            num_heldout=0,
            cache_dir=None if args.synthetic_cache is None else str(args.synthetic_cache),
        )
        train, evaluation = _split(world, args.train_split, "--train_split"), _split(world, args.eval_split, "--eval_split")
        if args.streaming:
            train, evaluation = train.to_iterable_dataset(), evaluation.to_iterable_dataset()
    elif Path(args.dataset).is_dir():
        try:
            loaded = datasets.load_from_disk(args.dataset)
        except IndexError as error:  # datasets' concat of a split's zero Arrow files
            raise ValueError(f"datasets cannot load --dataset {args.dataset}: a split saved with no rows has no data "
                             f"files, and load_from_disk fails on it ({error!r}). Leave empty splits out.") from error
        if not isinstance(loaded, datasets.DatasetDict):
            raise ValueError(f"--dataset {args.dataset} holds one split, not a DatasetDict: save it as "
                             f"DatasetDict({{'train': ..., 'validation': ...}}) (a few hundred images to evaluate on).")
        train, evaluation = _split(loaded, args.train_split, "--train_split"), _split(loaded, args.eval_split, "--eval_split")
        if args.streaming:
            train, evaluation = train.to_iterable_dataset(), evaluation.to_iterable_dataset()
    else:
        load = lambda split: datasets.load_dataset(  # noqa: E731
            args.dataset, args.dataset_config, split=split, streaming=args.streaming
        )
        train, evaluation = load(args.train_split), load(args.eval_split)
    for name, ds in (("train", train), ("eval", evaluation)):
        if ds.column_names is not None and args.image_column not in ds.column_names:
            raise ValueError(f"The {name} split has no column {args.image_column!r} (columns: {ds.column_names}).")
        if hasattr(ds, "__len__") and len(ds) == 0:
            raise ValueError(f"The {name} split ({args.train_split if name == 'train' else args.eval_split!r}) of "
                             f"--dataset has no rows.")
    keep = [args.image_column]
    return train.select_columns(keep), evaluation.select_columns(keep)


def _split(splits, name: str, flag: str):
    if name not in splits:
        raise ValueError(f"The dataset has no split {name!r} (its splits: {sorted(splits)}); pick one with {flag}.")
    return splits[name]


def row_images(row: dict, column: str) -> list:
    images = row[column]
    return list(images) if isinstance(images, (list, tuple)) else [images]


def image_stream(dataset, args, position: dict):
    """Endless `(image, position after it)` pairs over the training rows, reshuffled every epoch (epoch `e` with seed
    `args.seed + e`). A position is `{"rows": rows fully used, "images": images of the next row used, "epoch_rows":
    rows per epoch, once known}`; starting from a saved position replays the same order (`--resume`)."""
    rows, used, epoch_rows = position["rows"], position["images"], position.get("epoch_rows")
    is_map_style = hasattr(dataset, "__len__")
    if is_map_style:
        epoch_rows = len(dataset)
    while True:
        epoch, offset = divmod(rows, epoch_rows) if epoch_rows else (0, rows)
        if is_map_style:
            shuffled = dataset.shuffle(seed=args.seed + epoch)
        else:
            shuffled = dataset.shuffle(seed=args.seed + epoch, buffer_size=args.shuffle_buffer)
        images_this_epoch = 0
        for row in shuffled.skip(offset):
            images = row_images(row, args.image_column)
            images_this_epoch += len(images)
            for j in range(used, len(images)):
                last = j == len(images) - 1
                yield images[j], {"rows": rows + last, "images": 0 if last else j + 1, "epoch_rows": epoch_rows}
            rows, used = rows + 1, 0
        if rows == 0:
            raise ValueError("The training split has no rows.")
        if images_this_epoch == 0 and offset == 0:  # a whole pass without an image would loop for ever
            raise ValueError(f"The training split's rows hold no images in column {args.image_column!r}.")
        epoch_rows = epoch_rows or rows  # an iterable dataset's length is known after its first pass


def train_batches(stream, batch_size: int):
    """Batches of `batch_size` images from `image_stream`, each with the stream's position after it."""
    batch = []
    for image, position in stream:
        batch.append(image)
        if len(batch) == batch_size:
            yield batch, position
            batch = []


FREEFORM_EVAL_SEED = 1_000_003  # drawings for evals: a stream the training batches (seed --seed) never draw from


def with_freeform(images: list, step: int, args) -> list:
    """`images` with its first `round(--freeform-fraction * len)` entries replaced by step `step`'s drawings."""
    count = round(args.freeform_fraction * len(images))
    if count == 0:
        return images
    from ..synthetic.freeform import drawing_image

    base = step * len(images)
    drawn = [drawing_image(base + j, args.resolution, seed=args.seed, frame_fraction=args.freeform_frames)
             for j in range(count)]
    return drawn + list(images[count:])


def eval_images(dataset, args) -> list:
    images = []
    for row in dataset:
        images.extend(row_images(row, args.image_column))
        if len(images) >= args.eval_images:
            break
    return images[: args.eval_images]
