"""deconvnet: the toolbox of Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks"
(ECCV 2014): train ZFNet/AlexNet with the paper's recipe, project activations back to pixels with a
deconvnet, and run the paper's analyses."""
from .ablation import AblationResult, ablate
from .architecture import RunSummary, summarise
from .checkpoint import CheckpointInfo, load_checkpoint
from .correspondence import Correspondence, correspondence
from .data import Preprocess, open_source
from .deconvnet import Deconvnet
from .errors import UserError
from .evolution import EvolutionResult, evolution
from .invariance import Invariance, invariance
from .layer_features import LayerResult, layer_analysis
from .models import ModelConfig, build_model
from .occlusion import Occlusion, occlusion
from .subject import Subject, load_subject
from .train import TrainConfig, evaluate, train
from .transfer import TransferResult, find_overlaps, transfer

__version__ = "0.1.0"
__all__ = ["build_model", "load_checkpoint", "CheckpointInfo", "ModelConfig", "open_source", "Preprocess",
           "TrainConfig", "train", "evaluate", "UserError", "Deconvnet",
           "occlusion", "Occlusion", "invariance", "Invariance", "correspondence", "Correspondence",
           "evolution", "EvolutionResult", "summarise", "RunSummary", "ablate", "AblationResult",
           "transfer", "TransferResult", "find_overlaps", "layer_analysis", "LayerResult",
           "Subject", "load_subject"]
