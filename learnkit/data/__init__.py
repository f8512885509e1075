"""Data loading the fastai way: DataBlock over image folders or in-memory tensors, decoded once into a uint8
cache, batched and augmented on the device."""
from .block import (CategoryBlock, DataBlock, FuncSplitter, GrandparentSplitter, ImageBlock, IndexSplitter,
                    MultiCategoryBlock, PILImage, PILImageBW, RandomSplitter, RegexLabeller, get_image_files,
                    parent_label)
from .columns import ColReader, ColSplitter
from .factories import ImageDataLoaders
from .images import IMAGE_EXTENSIONS, ImageDecodeError, read_image
from .items import ItemPipeline
from .loaders import DataLoaders, TfmdDL
from .show import show_images
from .specs import TRANSFORMS, register_transform, transform_from_spec
from .transforms import (Augmentation, BatchTransform, Brightness, CenterCrop, Contrast, Flip, ItemTransform, Normalize,
                         RandomCrop, RandomResizedCrop, Resize, Rotate, aug_transforms)

__all__ = ['DataBlock', 'ImageBlock', 'CategoryBlock', 'MultiCategoryBlock', 'PILImage', 'PILImageBW',
           'get_image_files', 'RandomSplitter', 'GrandparentSplitter', 'FuncSplitter', 'IndexSplitter', 'ColSplitter',
           'parent_label', 'RegexLabeller', 'ColReader', 'TfmdDL', 'DataLoaders', 'ImageDataLoaders', 'Resize',
           'RandomResizedCrop', 'CenterCrop', 'Normalize', 'Flip', 'Rotate', 'Brightness', 'Contrast', 'RandomCrop',
           'aug_transforms', 'ItemTransform', 'BatchTransform', 'Augmentation', 'IMAGE_EXTENSIONS', 'ImageDecodeError',
           'read_image', 'show_images',
           'ItemPipeline', 'TRANSFORMS', 'register_transform', 'transform_from_spec']
