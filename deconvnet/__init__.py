"""deconvnet: the toolbox of Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks"
(ECCV 2014): train ZFNet/AlexNet with the paper's recipe, project activations back to pixels with a
deconvnet, and run the paper's analyses on the embedded data or on your own images and models.

Every analysis takes the model under study first: a :class:`Subject` (:func:`load_subject` from a
model spec, our checkpoint included) or a plain ``nn.Module`` (wrapped by :func:`as_subject`:
ImageNet preprocessing at 224 px). Each analysis is a module named after it, and the module is
callable as its analysis::

    import deconvnet, torchvision
    model = torchvision.models.resnet18()
    maps = deconvnet.occlusion(model, ["cat.jpg"])          # Fig. 7, the layer chosen by the model's rule
    deconvnet.occlusion.draw_occlusion(maps[0], "cat.png")  # the module's other names stay reachable

Analyses and their result types: ``topk`` (``TopK``, Fig. 2), ``evolution`` (``Evolution``, Fig. 4),
``invariance`` (``Invariance``, Fig. 5), ``architecture`` (``ArchitectureRun``, Fig. 6),
``occlusion`` (``Occlusion``, Fig. 7), ``correspondence`` (``Correspondence``, Table 1), ``ablation``
(``Ablation``, Table 3), ``transfer`` (``Transfer``, Tables 4/5), ``layer_features``
(``LayerFeatures``, Table 7), and ``sanity`` (``Sanity``: can the projections be trusted?).
"""
from . import (ablation, architecture, correspondence, evolution, invariance, layer_features, occlusion, sanity,
               topk, train, transfer)
from .ablation import Ablation
from .architecture import ArchitectureRun
from .checkpoint import CheckpointInfo, load_checkpoint
from .correspondence import Correspondence
from .data import Preprocess, open_source
from .deconvnet import Deconvnet, Projection, project
from .errors import UserError
from .evolution import Evolution
from .invariance import Invariance
from .layer_features import LayerFeatures
from .models import ModelConfig, build_model
from .occlusion import Occlusion
from .sanity import Sanity
from .subject import Subject, as_subject, load_subject
from .topk import TopK
from .train import TrainConfig, evaluate
from .transfer import Transfer, find_overlaps

__version__ = "0.1.0"
__all__ = ["Subject", "load_subject", "as_subject", "build_model", "load_checkpoint", "CheckpointInfo",
           "ModelConfig", "open_source", "Preprocess", "TrainConfig", "train", "evaluate", "UserError",
           "Deconvnet", "Projection", "project",
           "topk", "TopK", "evolution", "Evolution", "invariance", "Invariance", "architecture", "ArchitectureRun",
           "occlusion", "Occlusion", "correspondence", "Correspondence", "ablation", "Ablation",
           "transfer", "Transfer", "find_overlaps", "layer_features", "LayerFeatures", "sanity", "Sanity"]
