"""learnkit's CNNs: the blocks they are built from, the chapters' models, and a registry to rebuild them by name."""
from .batchnorm import BatchNorm
from .chapter import simple_cnn
from .classic import alexnet, lenet, nin, nin_block, vgg, vgg_block
from .densenet import DenseBlock, densenet, transition
from .inception import Inception, googlenet
from .layers import (ConvBN, DepthwiseSeparableConv, Flatten, ResBlock, SEBlock, classifier_head, conv, init_cnn,
                     max_pool)
from .mobilenet import mobilenet
from .registry import MODELS, get_model, register_model
from .resnet import resnet18, resnet34, se_resnet
from .torchvision_models import torchvision_model
from .vision import (IMAGENET_STATS, AdaptiveConcatPool2d, body_head_split, create_body, create_head,
                     create_vision_model, vision_model)

__all__ = ['conv', 'ConvBN', 'Flatten', 'ResBlock', 'DepthwiseSeparableConv', 'SEBlock', 'max_pool', 'classifier_head',
           'init_cnn', 'BatchNorm', 'simple_cnn', 'lenet', 'alexnet', 'vgg_block', 'vgg', 'nin_block', 'nin',
           'Inception', 'googlenet', 'resnet18', 'resnet34', 'se_resnet', 'DenseBlock', 'transition', 'densenet',
           'mobilenet', 'torchvision_model', 'register_model', 'get_model', 'MODELS', 'IMAGENET_STATS',
           'AdaptiveConcatPool2d', 'create_head', 'create_body', 'body_head_split', 'create_vision_model', 'vision_model']
