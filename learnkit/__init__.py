"""learnkit: train PyTorch models the fastai way.

Everything public is importable from here: `from learnkit import Learner, Callback, accuracy, ...`.
"""
from fastcore.basics import first   # the chapter calls first(dls.valid)

from .callback import (Callback, CancelBackwardException, CancelBatchException, CancelEpochException,
                       CancelFitException, CancelStepException, CancelTrainException, CancelValidException,
                       EVENTS)
from .callbacks.distributed import (DistributedCallback, distrib_ctx, is_rank0, num_distrib, rank0_only,
                                    rank_distrib, unwrap_model)
from .callbacks.activations import ActivationStats
from .callbacks.batch_size import BatchSizeScheduler, GradientAccumulation, GradientNoiseScale, noise_scale_estimate
from .callbacks.core import GatherPredsCallback, TrainEvalCallback
from .callbacks.gradients import GradientStats
from .callbacks.inputs import InputStats
from .callbacks.outputs import OutputStats
from .callbacks.weights import WeightStats
from .callbacks.stats import StatsCallback
from .callbacks.hooks import Hook, HookCallback, Hooks, hook_output, hook_outputs
from .callbacks.logging import CSVLogger, TensorBoardCallback
from .callbacks.mixed_precision import MixedPrecision
from .callbacks.progress import ProgressCallback
from .callbacks.recorder import Recorder
from .callbacks.schedule import (LRFinder, ParamScheduler, SchedCos, SchedExp, SchedLin, SchedNo, SchedPoly,
                                 SuggestedLRs, combine_scheds, combined_cos)
from .callbacks.tracking import EarlyStoppingCallback, SaveModelCallback, TerminateOnNaNCallback, TrackerCallback
from .checkpoint import CheckpointError, UnsafeCheckpointError, load_learner
from .data import (Brightness, CategoryBlock, CenterCrop, ColReader, ColSplitter, Contrast, DataBlock, DataLoaders,
                   Flip, FuncSplitter, GrandparentSplitter, ImageBlock, ImageDataLoaders, IndexSplitter,
                   MultiCategoryBlock, Normalize, PILImage, PILImageBW, RandomCrop, RandomResizedCrop, RandomSplitter,
                   RegexLabeller, Resize, Rotate, TfmdDL, aug_transforms, get_image_files, parent_label)
from .data.specs import register_transform
from .datasets import fashion_mnist, fashion_mnist_tree
from .diagnostics import (ClassificationInterpretation, Finding, HealthMonitor, HealthReport, Thresholds, diagnose,
                          health_cbs)
from .experiments import Comparison, compare
from .learner import Learner, default_callbacks, default_device
from .losses import CrossEntropyLossFlat
from .metrics import AvgLoss, AvgMetric, AvgSmoothLoss, Metric, accuracy, accuracy_multi, error_rate
from .models import (MODELS, BatchNorm, ConvBN, DenseBlock, DepthwiseSeparableConv, Flatten, Inception, ResBlock,
                     SEBlock, alexnet, classifier_head, conv, densenet, get_model, googlenet, init_cnn, lenet, max_pool,
                     mobilenet, nin, nin_block, register_model, resnet18, resnet34, se_resnet, simple_cnn,
                     torchvision_model, transition, vgg, vgg_block)
from .models.vision import IMAGENET_STATS, AdaptiveConcatPool2d, create_head, create_vision_model
from .optimizer import SGD, Adam, OptimWrapper, RMSProp
from .torch_core import NoneReduce, find_bs, flatten_model, tensor, to_detach, unsqueeze
from .transfer import vision_learner

__version__ = '0.1.0'
