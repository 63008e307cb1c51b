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

import os

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from jax_oneclass.errors import ConfigError, DataError

CATEGORIES = ('bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut',
              'leather', 'metal_nut', 'pill', 'screw', 'tile', 'toothbrush',
              'transistor', 'wood', 'zipper')
LABEL_NAMES = ('good', 'defect')
SPLITS = ('train', 'test')
_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
_VERSION = '1.0.0'

_LAYOUT = ('expected layout: <root>/<category>/train/good/*.png, '
           '<root>/<category>/test/<good or defect type>/*.png and '
           '<root>/<category>/ground_truth/<defect type>/<stem>_mask.png')

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

  name = 'mvtec_ad'
  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: 'Images, 0/255 pixel masks, labels.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=c, version=_VERSION,
                              description=f'MVTec AD category {c}.')
      for c in CATEGORIES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  # tfds's own lookup of this file needs the importlib_resources backport,
  # which tfds does not install.
  code_path = tfds.core.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Industrial images with pixel-level anomaly masks '
                     '(mask 255 = anomalous pixel).'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3),
                                         encoding_format='png'),
            'mask': tfds.features.Image(shape=(None, None, 1),
                                        encoding_format='png'),
            'label': tfds.features.ClassLabel(names=LABEL_NAMES),
            'defect_type': tfds.features.Text(),
            'filename': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://www.mvtec.com/company/research/datasets/mvtec-ad',
        citation=_CITATION,
        # Records which folder was built, to catch a stale data_dir later.
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    try:
      root = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # tfds's way of saying it is missing.
      raise DataError(f'{e}\n{_LAYOUT}.') from e
    category = self.builder_config.name
    examples = _list_examples(root, category)
    self.info.metadata['source_dir'] = os.path.join(root, category)
    # Saved with the prepared data, so sources know the class sizes without
    # reading every record.
    self.info.metadata['label_counts'] = {
        split: [sum(item['label'] == label for item in items)
                for label in range(len(LABEL_NAMES))]
        for split, items in examples.items()}
    return {split: self._generate_examples(items)
            for split, items in examples.items()}

  def _generate_examples(self, items):
    for item in items:
      yield item['filename'], _encode_example(item)


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
        name=category, version=_VERSION,
        description=f'Folder laid out like MVTec AD: {category}.')
  return MVTecAD(config=config, data_dir=data_dir)


def build_mvtec_like(root, category: str | None = None,
                     data_dir=None) -> MVTecAD:
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
  root = os.fspath(root).rstrip('/') or '/'
  if category is None:
    root, category = os.path.split(root)
  builder = mvtec_builder(category, data_dir)
  source_dir = os.path.join(root, category)
  if builder.is_prepared():
    built_from = builder.info.metadata.get('source_dir')
    if built_from and built_from != source_dir:
      logging.warning('Reusing %s prepared from %s, not %s; use another '
                      'data_dir to build %s.', builder.data_dir, built_from,
                      source_dir, source_dir)
    return builder
  _list_examples(root, category)  # Fails fast, before tfds sets up.
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=root))
  return builder


def mvtec_records(builder: tfds.core.DatasetBuilder,
                  split: str) -> tf.data.Dataset:
  """Decoded records of a prepared split, in tfds's stored order.

  Returns:
    tf.data of {'image': uint8 [H, W, 3], 'mask': bool [H, W] (True =
    anomalous pixel), 'label': int32 (0 good, 1 defect), 'defect_type':
    string, 'filename': string}.
  """
  if split not in SPLITS:
    raise ConfigError(f'Unknown split {split!r}; valid splits: {SPLITS}.')
  if not builder.is_prepared():
    raise DataError(f'{builder.info.full_name} is not prepared in '
                    f'{builder.data_dir}; call build_mvtec_like first.')
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return ds.map(_decoded_record, num_parallel_calls=tf.data.AUTOTUNE)


def _decoded_record(example):
  return {'image': example['image'],
          'mask': example['mask'][..., 0] > 0,
          'label': tf.cast(example['label'], tf.int32),
          'defect_type': example['defect_type'],
          'filename': example['filename']}


# ---------------------------------------------------------------- listing ---


def _image_files(directory: str) -> list[str]:
  return sorted(f for f in tf.io.gfile.listdir(directory)
                if f.lower().endswith(_IMAGE_EXTENSIONS))


def _image_size(path: str) -> tuple[int, int]:
  """(width, height) from the file header, without decoding the pixels."""
  with tf.io.gfile.GFile(path, 'rb') as f, Image.open(f) as image:
    return image.size


def _find_mask(mask_dir: str, stem: str) -> str | None:
  for extension in _IMAGE_EXTENSIONS:
    path = os.path.join(mask_dir, f'{stem}_mask{extension}')
    if tf.io.gfile.exists(path):
      return path
  return None


def _check_category_dir(root: str, category: str) -> str:
  if not tf.io.gfile.isdir(root):
    raise DataError(f'MVTec root folder {root!r} does not exist; pass the '
                    'extracted mvtec_anomaly_detection folder (or a folder '
                    f'laid out like it); {_LAYOUT}.')
  category_dir = os.path.join(root, category)
  if tf.io.gfile.isdir(category_dir):
    return category_dir
  if category not in CATEGORIES:
    raise DataError(
        f'Unknown MVTec AD category {category!r} and no folder '
        f'{category_dir!r}. The 15 MVTec AD categories are '
        f'{", ".join(CATEGORIES)}; any other name must be a folder '
        f'<root>/<name> laid out like MVTec AD ({_LAYOUT}), e.g. '
        "build_mvtec_like('/data/my_parts', 'widget') for "
        '/data/my_parts/widget/.')
  raise DataError(f'No folder {category_dir!r} for MVTec AD category '
                  f'{category!r}; {_LAYOUT}.')


def _list_examples(root: str, category: str) -> dict[str, list[dict]]:
  """Checks a category folder and lists its examples per split.

  Returns:
    split -> [{'filename', 'image' (path), 'mask' (path or None), 'label',
    'defect_type'}], sorted by filename.

  Raises:
    DataError: a folder is missing or empty, or a defective test image has no
      mask or one of another size.
  """
  category_dir = _check_category_dir(root, category)
  good_dir = os.path.join(category_dir, 'train', 'good')
  if not tf.io.gfile.isdir(good_dir) or not _image_files(good_dir):
    raise DataError(f'No training images in {good_dir!r}; {_LAYOUT}.')
  train = [_example(category_dir, 'train', 'good', f, None)
           for f in _image_files(good_dir)]

  test_dir = os.path.join(category_dir, 'test')
  defect_types = (sorted(d.rstrip('/') for d in tf.io.gfile.listdir(test_dir)
                         if tf.io.gfile.isdir(os.path.join(test_dir, d)))
                  if tf.io.gfile.isdir(test_dir) else [])
  test = []
  for defect_type in defect_types:
    for f in _image_files(os.path.join(test_dir, defect_type)):
      test.append(_example(category_dir, 'test', defect_type, f,
                           _checked_mask(category_dir, defect_type, f)))
  if not test:
    raise DataError(f'No test images in {test_dir!r}; {_LAYOUT}.')
  return {'train': train, 'test': test}


def _checked_mask(category_dir: str, defect_type: str,
                  image_file: str) -> str | None:
  """The mask path of a test image: None for good, checked for defects."""
  if defect_type == 'good':
    return None
  mask_dir = os.path.join(category_dir, 'ground_truth', defect_type)
  stem = os.path.splitext(image_file)[0]
  mask = _find_mask(mask_dir, stem)
  image = os.path.join(category_dir, 'test', defect_type, image_file)
  if mask is None:
    raise DataError(f'Missing mask {os.path.join(mask_dir, stem)}_mask.png '
                    f'for defective test image {image}; {_LAYOUT}.')
  if _image_size(mask) != _image_size(image):
    raise DataError(f'Mask {mask} is {_image_size(mask)} (width, height) but '
                    f'its image {image} is {_image_size(image)}.')
  return mask


def _example(category_dir, split, defect_type, image_file, mask) -> dict:
  return {'filename': f'{split}/{defect_type}/{image_file}',
          'image': os.path.join(category_dir, split, defect_type, image_file),
          'mask': mask,
          'label': int(defect_type != 'good'),
          'defect_type': defect_type}


# --------------------------------------------------------------- encoding ---


def _encode_example(item: dict) -> dict:
  image, size = _load_image(item['image'])
  return {'image': image,
          'mask': _load_mask(item['mask'], size),
          'label': item['label'],
          'defect_type': item['defect_type'],
          'filename': item['filename']}


def _load_image(path: str):
  """(path or RGB PIL image, (width, height)); RGB files are kept as stored."""
  with tf.io.gfile.GFile(path, 'rb') as f, Image.open(f) as image:
    if image.mode == 'RGB':
      return path, image.size
    return image.convert('RGB'), image.size


def _load_mask(path: str | None, size: tuple[int, int]):
  """Path of a 0/255 mask file, or the mask as uint8 [H, W, 1] in {0, 255}."""
  if path is None:
    return np.zeros((size[1], size[0], 1), np.uint8)
  with tf.io.gfile.GFile(path, 'rb') as f, Image.open(f) as mask:
    mode = mask.mode
    values = np.asarray(mask.convert('L') if mode != 'L' else mask)
  if mode == 'L' and np.isin(values, (0, 255)).all():
    return path
  return np.where(values > 0, 255, 0).astype(np.uint8)[..., None]
