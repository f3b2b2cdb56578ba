"""deconvnet: the toolbox of Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks"
(ECCV 2014): train ZFNet/AlexNet with the paper's recipe, project activations back to pixels with a
deconvnet, and run the paper's analyses."""
from .checkpoint import CheckpointInfo, load_checkpoint
from .correspondence import Correspondence, correspondence
from .data import Preprocess, open_source
from .deconvnet import Deconvnet
from .errors import UserError
from .invariance import Invariance, invariance
from .models import ModelConfig, build_model
from .occlusion import Occlusion, occlusion
from .train import TrainConfig, evaluate, train

__version__ = "0.1.0"
__all__ = ["build_model", "load_checkpoint", "CheckpointInfo", "ModelConfig", "open_source", "Preprocess",
           "TrainConfig", "train", "evaluate", "UserError", "Deconvnet",
           "occlusion", "Occlusion", "invariance", "Invariance", "correspondence", "Correspondence"]
