"""MVTec AD, and any folder laid out like it, as a tfds data set with masks.

Layout of one category (MVTec AD's own):

  <root>/<category>/train/good/*.png
  <root>/<category>/test/<good or defect type>/*.png
  <root>/<category>/ground_truth/<defect type>/<stem>_mask.png

Nothing is downloaded: the builder reads a copy the user has extracted.
`build_mvtec_like(root, category)` prepares one category (one of the 15, or
any other MVTec-shaped folder) and returns its builder; `mvtec_records` reads
a split back as decoded tensors.

Stored features: 'image' uint8 [H, W, 3] (grayscale categories are converted
to RGB; RGB files are kept byte for byte), 'mask' uint8 [H, W, 1] with values
0 (normal) and 255 (anomalous), as in MVTec's own mask files (any non-zero
mask pixel of a look-alike folder becomes 255; good images get an all-zero
mask), 'label' ClassLabel good=0 / defect=1, 'defect_type' (the test
subfolder, 'good' for normal images) and 'filename' (the path relative to the
category folder, e.g. 'test/scratch/000.png').
"""

import collections
import hashlib
import io
import os

import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from jax_oneclass import logging_utils
from jax_oneclass.errors import ConfigError, DataError

CATEGORIES = (
  "bottle",
  "cable",
  "capsule",
  "carpet",
  "grid",
  "hazelnut",
  "leather",
  "metal_nut",
  "pill",
  "screw",
  "tile",
  "toothbrush",
  "transistor",
  "wood",
  "zipper",
)
LABEL_NAMES = ("good", "defect")
SPLITS = ("train", "test")
# What PIL decodes (GIF: the first frame); other files are skipped, named.
_IMAGE_EXTENSIONS = (
  ".png",
  ".jpg",
  ".jpeg",
  ".bmp",
  ".webp",
  ".tif",
  ".tiff",
  ".gif",
)
_VERSION = "1.0.0"

_LAYOUT = (
  "expected layout: <root>/<category>/train/good/*.png, "
  "<root>/<category>/test/<good or defect type>/*.png and "
  "<root>/<category>/ground_truth/<defect type>/<stem>_mask.png"
)

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad
(CC BY-NC-SA 4.0), extract mvtec_anomaly_detection.tar.xz and pass the
extracted folder, the one that holds bottle/, cable/, ..., zipper/, as the
manual dir:

  from jax_oneclass.data import mvtec
  builder = mvtec.build_mvtec_like('/path/to/mvtec_anomaly_detection',
                                   'bottle', data_dir='/path/to/tfds')

or `tfds.builder('mvtec_ad/bottle').download_and_prepare(
download_config=tfds.download.DownloadConfig(manual_dir=...))` after importing
jax_oneclass.data.mvtec.
"""

_CITATION = """\
@inproceedings{bergmann2019mvtec,
  title={{MVTec AD} -- A Comprehensive Real-World Dataset for Unsupervised
         Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and
          Steger, Carsten},
  booktitle={CVPR},
  year={2019}
}
"""


class MVTecAD(tfds.core.GeneratorBasedBuilder):
  """MVTec AD: one config per category; 'train' is good images only."""

  name = "mvtec_ad"
  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "Images, 0/255 pixel masks, labels."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(
      name=c, version=_VERSION, description=f"MVTec AD category {c}."
    )
    for c in CATEGORIES
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  # tfds's own lookup of this file needs the importlib_resources backport,
  # which tfds does not install.
  code_path = tfds.core.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "Industrial images with pixel-level anomaly masks "
        "(mask 255 = anomalous pixel)."
      ),
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(
            shape=(None, None, 3), encoding_format="png"
          ),
          "mask": tfds.features.Image(
            shape=(None, None, 1), encoding_format="png"
          ),
          "label": tfds.features.ClassLabel(names=LABEL_NAMES),
          "defect_type": tfds.features.Text(),
          "filename": tfds.features.Text(),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
      citation=_CITATION,
      # Records which folder was built, to catch a stale data_dir later.
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    try:
      root = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # tfds's way of saying it is missing.
      raise DataError(f"{e}\n{_LAYOUT}.") from e
    category = self.builder_config.name
    examples = _list_examples(root, category, validate=True)
    self.info.metadata["source_dir"] = os.path.join(root, category)
    self.info.metadata["source_fingerprint"] = source_fingerprint(
      os.path.join(root, category)
    )
    # Saved with the prepared data, so sources know the class sizes without
    # reading every record.
    self.info.metadata["label_counts"] = {
      split: [
        sum(item["label"] == label for item in items)
        for label in range(len(LABEL_NAMES))
      ]
      for split, items in examples.items()
    }
    return {
      split: self._generate_examples(items) for split, items in examples.items()
    }

  # tfds prints 'Downloading and preparing ...' and '... downloaded and
  # prepared': nothing is downloaded from a local folder.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _generate_examples(self, items):
    for item in items:
      yield item["filename"], _encode_example(item)


def mvtec_builder(category: str, data_dir=None) -> MVTecAD:
  """The (possibly unprepared) builder of one category.

  Args:
    category: one of CATEGORIES, or the name of a look-alike category folder
      (a custom tfds config of that name; its data lives under
      <data_dir>/mvtec_ad/<category>/, so two different look-alike folders of
      the same name need different data_dirs).
    data_dir: tfds data dir; None for the tfds default.
  """
  if category in CATEGORIES:
    config = category
  else:
    config = tfds.core.BuilderConfig(
      name=category,
      version=_VERSION,
      description=f"Folder laid out like MVTec AD: {category}.",
    )
  return MVTecAD(config=config, data_dir=data_dir)


def build_mvtec_like(
  root, category: str | None = None, data_dir=None
) -> MVTecAD:
  """Prepares one MVTec(-like) category and returns its builder.

  Already prepared data in data_dir is reused without reading root.

  Args:
    root: the folder holding <category>/ (for MVTec AD the extracted
      mvtec_anomaly_detection folder); with category=None, the category
      folder itself, whose base name becomes the category.
    category: one of CATEGORIES, or any other subfolder of root laid out
      like MVTec AD.
    data_dir: where tfds writes the prepared data; None for the tfds default.
  """
  root = os.fspath(root).rstrip("/") or "/"
  if category is None:
    root, category = os.path.split(root)
  source_dir = os.path.join(root, category)
  with _quiet_tfds():  # Its notes on custom configs and fresh folders.
    builder = mvtec_builder(category, data_dir)
    if builder.is_prepared():
      _check_prepared_source(builder, source_dir)
      return builder
    _list_examples(root, category)  # Fails fast, before tfds sets up.
    logging_utils.info(
      f"Preparing {source_dir} in {builder.data_dir} "
      "(once; later runs reuse it)."
    )
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=root)
    )
  return builder


class _quiet_tfds:  # pylint: disable=invalid-name
  """Raises the 'absl' logger to ERROR while tfds reads local data."""

  def __enter__(self):
    import logging  # pylint: disable=g-import-not-at-top

    self._logger = logging.getLogger("absl")
    self._level = self._logger.level
    self._logger.setLevel(max(self._level, logging.ERROR))

  def __exit__(self, *exc):
    self._logger.setLevel(self._level)


def source_fingerprint(category_dir: str) -> str:
  """SHA-256 of the sorted (relative path, size) of every file under
  `category_dir`: changes when files are added, removed or rewritten with
  another size."""
  digest = hashlib.sha256()
  for directory, _, files in sorted(tf.io.gfile.walk(category_dir)):
    for name in sorted(files):
      path = os.path.join(directory, name)
      relative = os.path.relpath(path, category_dir)
      digest.update(f"{relative}\t{tf.io.gfile.stat(path).length}\n".encode())
  return digest.hexdigest()


def _check_prepared_source(builder, source_dir: str) -> None:
  """Refuses prepared data whose source folder exists but differs now."""
  built_from = builder.info.metadata.get("source_dir")
  saved = builder.info.metadata.get("source_fingerprint")
  if not saved or not tf.io.gfile.isdir(source_dir):
    return  # Prepared before fingerprints, or the folder is gone: reuse.
  if source_fingerprint(source_dir) == saved:
    return
  what = (
    "its files changed since"
    if built_from == source_dir
    else f"it was prepared from {built_from}, whose files differ"
  )
  raise DataError(
    f"The prepared data in {builder.data_dir} does not match {source_dir}: "
    f"{what}. Delete {builder.data_dir} to prepare it again from the "
    "folder, or pass another --config.data.data_dir."
  )


def mvtec_records(
  builder: tfds.core.DatasetBuilder, split: str
) -> tf.data.Dataset:
  """Decoded records of a prepared split, in tfds's stored order.

  Returns:
    tf.data of {'image': uint8 [H, W, 3], 'mask': bool [H, W] (True =
    anomalous pixel), 'label': int32 (0 good, 1 defect), 'defect_type':
    string, 'filename': string}.
  """
  if split not in SPLITS:
    raise ConfigError(f"Unknown split {split!r}; valid splits: {SPLITS}.")
  if not builder.is_prepared():
    raise DataError(
      f"{builder.info.full_name} is not prepared in "
      f"{builder.data_dir}; call build_mvtec_like first."
    )
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return ds.map(_decoded_record, num_parallel_calls=tf.data.AUTOTUNE)


def _decoded_record(example):
  return {
    "image": example["image"],
    "mask": example["mask"][..., 0] > 0,
    "label": tf.cast(example["label"], tf.int32),
    "defect_type": example["defect_type"],
    "filename": example["filename"],
  }


# ---------------------------------------------------------------- listing ---


def _image_files(directory: str, skipped=None) -> list[str]:
  """Image files of `directory`; others are counted in `skipped` by
  extension."""
  names = sorted(
    f
    for f in tf.io.gfile.listdir(directory)
    if not tf.io.gfile.isdir(os.path.join(directory, f))
  )
  if skipped is not None:
    for f in names:
      if not f.lower().endswith(_IMAGE_EXTENSIONS) and not f.startswith("."):
        skipped[os.path.splitext(f)[1].lower() or f].append(
          os.path.join(directory, f)
        )
  return [f for f in names if f.lower().endswith(_IMAGE_EXTENSIONS)]


def read_bytes(path: str) -> bytes:
  """A file's bytes: local paths through Python, others (gs://...) through
  tf.io.gfile. PIL reads from these bytes, not from a GFile: its seeks on
  a GFile can fail with 'reached end of file'."""
  if "://" not in str(path):
    with open(path, "rb") as f:
      return f.read()
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def unreadable_image(path: str) -> str | None:
  """Why PIL cannot decode the image at `path`, or None."""
  try:
    with Image.open(io.BytesIO(read_bytes(path))) as image:
      image.load()
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises several types for bad files, GFile tf.errors.
    return str(e).split("\n")[0][:80] or type(e).__name__
  return None


def _image_size(path: str) -> tuple[int, int]:
  """(width, height) from the file header, without decoding the pixels."""
  with Image.open(io.BytesIO(read_bytes(path))) as image:
    return image.size


def _find_mask(mask_dir: str, stem: str) -> str | None:
  for extension in _IMAGE_EXTENSIONS:
    path = os.path.join(mask_dir, f"{stem}_mask{extension}")
    if tf.io.gfile.exists(path):
      return path
  return None


def _check_category_dir(root: str, category: str) -> str:
  if not tf.io.gfile.isdir(root):
    raise DataError(
      f"MVTec root folder {root!r} does not exist; pass the "
      "extracted mvtec_anomaly_detection folder (or a folder "
      f"laid out like it); {_LAYOUT}."
    )
  category_dir = os.path.join(root, category)
  if tf.io.gfile.isdir(category_dir):
    return category_dir
  if category not in CATEGORIES:
    raise DataError(
      f"Unknown MVTec AD category {category!r} and no folder "
      f"{category_dir!r}. The 15 MVTec AD categories are "
      f"{', '.join(CATEGORIES)}; any other name must be a folder "
      f"<root>/<name> laid out like MVTec AD ({_LAYOUT}), e.g. "
      "build_mvtec_like('/data/my_parts', 'widget') for "
      "/data/my_parts/widget/."
    )
  raise DataError(
    f"No folder {category_dir!r} for MVTec AD category {category!r}; {_LAYOUT}."
  )


def _list_examples(
  root: str, category: str, validate: bool = False
) -> dict[str, list[dict]]:
  """Checks a category folder and lists its examples per split.

  Files of other extensions are skipped; with `validate`, so are image
  files PIL cannot decode (not an image, truncated), and a warning names
  the files skipped.

  Returns:
    split -> [{'filename', 'image' (path), 'mask' (path or None), 'label',
    'defect_type'}], sorted by filename.

  Raises:
    DataError: a folder is missing or has no readable images, or a
      defective test image has no mask or one of another size.
  """
  category_dir = _check_category_dir(root, category)
  skipped, bad = collections.defaultdict(list), []

  def readable(split, defect_type, files):
    out = []
    for f in files:
      path = os.path.join(category_dir, split, defect_type, f)
      why = unreadable_image(path) if validate else None
      if why is None:
        out.append(f)
      else:
        bad.append(f"{split}/{defect_type}/{f} ({why})")
    return out

  good_dir = os.path.join(category_dir, "train", "good")
  files = _image_files(good_dir, skipped) if tf.io.gfile.isdir(good_dir) else []
  train = [
    _example(category_dir, "train", "good", f, None)
    for f in readable("train", "good", files)
  ]

  test_dir = os.path.join(category_dir, "test")
  defect_types = (
    sorted(
      d.rstrip("/")
      for d in tf.io.gfile.listdir(test_dir)
      if tf.io.gfile.isdir(os.path.join(test_dir, d))
    )
    if tf.io.gfile.isdir(test_dir)
    else []
  )
  test = []
  for defect_type in defect_types:
    files = _image_files(os.path.join(test_dir, defect_type), skipped)
    for f in readable("test", defect_type, files):
      test.append(
        _example(
          category_dir,
          "test",
          defect_type,
          f,
          _checked_mask(category_dir, defect_type, f),
        )
      )
  if validate and bad:
    logging_utils.warn(
      f"Skipped {len(bad)} image files of {category_dir} that cannot be "
      f"decoded: {'; '.join(bad[:5])}" + (" ..." if len(bad) > 5 else "") + "."
    )
  if validate and skipped:
    count = sum(len(v) for v in skipped.values())
    kinds = ", ".join(f"{k} ({len(v)})" for k, v in sorted(skipped.items()))
    logging_utils.warn(
      f"Skipped {count} files of {category_dir} that are not images by "
      f"their extension: {kinds}; e.g. {next(iter(skipped.values()))[0]}."
    )
  if not train:
    raise DataError(
      f"No readable training images in {good_dir!r}"
      + (f" ({len(bad)} could not be decoded)" if bad else "")
      + f"; {_LAYOUT}."
    )
  if not test:
    raise DataError(f"No readable test images in {test_dir!r}; {_LAYOUT}.")
  return {"train": train, "test": test}


def _checked_mask(
  category_dir: str, defect_type: str, image_file: str
) -> str | None:
  """The mask path of a test image: None for good, checked for defects."""
  if defect_type == "good":
    return None
  mask_dir = os.path.join(category_dir, "ground_truth", defect_type)
  stem = os.path.splitext(image_file)[0]
  mask = _find_mask(mask_dir, stem)
  image = os.path.join(category_dir, "test", defect_type, image_file)
  if mask is None:
    raise DataError(
      f"Missing mask {os.path.join(mask_dir, stem)}_mask.png "
      f"for defective test image {image}; {_LAYOUT}."
    )
  if _image_size(mask) != _image_size(image):
    raise DataError(
      f"Mask {mask} is {_image_size(mask)} (width, height) but "
      f"its image {image} is {_image_size(image)}."
    )
  return mask


def _example(category_dir, split, defect_type, image_file, mask) -> dict:
  return {
    "filename": f"{split}/{defect_type}/{image_file}",
    "image": os.path.join(category_dir, split, defect_type, image_file),
    "mask": mask,
    "label": int(defect_type != "good"),
    "defect_type": defect_type,
  }


# --------------------------------------------------------------- encoding ---


def _encode_example(item: dict) -> dict:
  image, size = _load_image(item["image"])
  return {
    "image": image,
    "mask": _load_mask(item["mask"], size),
    "label": item["label"],
    "defect_type": item["defect_type"],
    "filename": item["filename"],
  }


def _load_image(path: str):
  """(path or RGB PIL image, (width, height)); RGB files are kept as stored."""
  with Image.open(io.BytesIO(read_bytes(path))) as image:
    if image.mode == "RGB" and image.format in ("PNG", "JPEG"):
      return path, image.size
    return np.asarray(image.convert("RGB")), image.size


def _load_mask(path: str | None, size: tuple[int, int]):
  """Path of a 0/255 mask file, or the mask as uint8 [H, W, 1] in {0, 255}."""
  if path is None:
    return np.zeros((size[1], size[0], 1), np.uint8)
  with Image.open(io.BytesIO(read_bytes(path))) as mask:
    mode = mask.mode
    values = np.asarray(mask.convert("L") if mode != "L" else mask)
  if mode == "L" and np.isin(values, (0, 255)).all():
    return path
  return np.where(values > 0, 255, 0).astype(np.uint8)[..., None]
