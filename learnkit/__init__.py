"""learnkit: train PyTorch models the fastai way.

Everything public is importable from here: `from learnkit import Learner, Callback, accuracy, ...`.
"""
from .callback import (Callback, CancelBackwardException, CancelBatchException, CancelEpochException,
                       CancelFitException, CancelStepException, CancelTrainException, CancelValidException,
                       EVENTS)
from .callbacks.core import GatherPredsCallback, TrainEvalCallback
from .callbacks.progress import ProgressCallback
from .callbacks.recorder import Recorder
from .callbacks.schedule import (LRFinder, ParamScheduler, SchedCos, SchedExp, SchedLin, SchedNo, SchedPoly,
                                 SuggestedLRs, combine_scheds, combined_cos)
from .learner import Learner, default_callbacks, default_device
from .metrics import AvgLoss, AvgMetric, AvgSmoothLoss, Metric, accuracy, error_rate
from .optimizer import SGD, Adam, OptimWrapper, RMSProp

__version__ = '0.1.0'
