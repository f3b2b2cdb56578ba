"""The paper's sections, once: what each reports, the command that makes it, where its result is.

Used by ``reproduce`` (which runs the steps), the report it writes, and ``deconvnet report`` (the
sections that run on a user's model). Paper order.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    """``label`` and ``title`` as in the paper; ``paper``: what the paper reports, in words; ``command``:
    the function of :mod:`deconvnet.commands` that makes it, run as the step ``step`` (a directory of the
    report) and writing ``result`` (a JSON with its findings); ``offline``: for the sections whose data
    is not available here, why, and the commands that make them given the data."""

    label: str
    title: str
    paper: str
    command: str | None = None
    step: str | None = None
    result: str | None = None
    offline: tuple[str, str] | None = None

    @property
    def anchor(self) -> str:
        """The section's id in the report page, e.g. ``fig2``, ``tables4-5-fig9``."""
        return self.label.lower().replace(" ", "").replace(".", "").replace("/", "-").replace(",", "")


OFFLINE = {
    "Table 2": ("ImageNet is not available offline, so this table cannot be reproduced here. With the "
                "ILSVRC-2012 train and val sets in the ImageFolder layout:",
                "deconvnet train --model zfnet --data folder:/data/ilsvrc12/train --val folder:/data/ilsvrc12/val "
                "--out runs/zfnet --workers 8\n"
                "deconvnet evaluate --checkpoint runs/zfnet/final.pt --data folder:/data/ilsvrc12/val --ten-crop\n"
                "deconvnet train --model alexnet --data folder:/data/ilsvrc12/train --val folder:/data/ilsvrc12/val "
                "--out runs/alexnet --workers 8"),
    "Table 6": ("PASCAL VOC 2012 is not available offline. With its images arranged one folder per class "
                "(the dominant object's class) and an ImageNet-trained checkpoint:",
                "deconvnet transfer --checkpoint runs/zfnet/final.pt --target folder:/data/voc12-by-class "
                "--per-class 30 --folds 5 --out runs/table6"),
}

SECTIONS = [
    Section('Fig. 2', 'Feature visualisation: top-9 activations per feature map, projected to pixels',
        'Projections of the top 9 activations of random feature maps in layers 1-5 beside their input'
        ' patches: edges and colour blobs in layer 1, textures in layer 2, object parts higher up.',
        command='topk', step='fig2', result='topk.json'),
    Section('Sanity checks', "Can the projections be trusted? Randomisation, specificity, deletion",
        'The paper reads each projection as what the unit responds to (Sec. 2.1); it does not test that '
        'reading. Later work did: Guided Backprop barely changes when the weights are randomised (Adebayo '
        'et al. 2018), and deconvnet and Guided Backprop largely reconstruct the image (Nie et al. 2018).',
        command='sanity', step='sanity', result='sanity.json'),
    Section('Fig. 3', 'Architecture and training',
        'ZFNet: conv1 96 7x7/2, conv2 256 5x5/2, conv3-5 384/384/256 3x3, fc6/fc7 4096, 70 epochs of '
        'SGD on ImageNet; 38.4% top-1 / 16.5% top-5 validation error (Table 2).',
        command='train', step='train', result=None),
    Section('Fig. 4', 'Feature evolution during training',
        'Lower layers converge within a few epochs; upper layers only after 40-50 epochs.',
        command='evolution', step='fig4', result='evolution.json'),
    Section('Fig. 5', 'Invariance to translation, scale and rotation',
        'Small transformations change layer 1 a lot and layer 7 much less; the output is stable to '
        'translation and scale but not to rotation.',
        command='invariance', step='fig5', result='invariance.json'),
    Section('Fig. 6', 'Architecture selection: layer-1 filters and layer-2 projections',
        "AlexNet's layer 1 mixes very high and low frequencies with dead filters, and its layer 2 "
        "aliases; ZFNet's smaller stride and kernel fix both; without RMS renormalisation one filter "
        'dominates.',
        command='architecture', step='fig6', result='architecture.json'),
    Section('Fig. 7', 'Occlusion sensitivity',
        'The probability of the correct class drops sharply when the square covers the object, and '
        'the strongest layer-5 map responds to the object.',
        command='occlusion', step='fig7', result='occlusion.json'),
    Section('Table 1', 'Part correspondence',
        'Layer 5: eyes 0.067-0.069, nose 0.079, random 0.107 (lower is tighter correspondence); layer'
        ' 7: all about 0.07.',
        command='correspondence', step='table1', result='correspondence.json'),
    Section('Table 2', 'ImageNet 2012 classification error',
        'One ZFNet: 38.4% top-1 / 16.5% top-5 validation error; replicated AlexNet 40.5 / 18.1.',
        offline=OFFLINE['Table 2']),
    Section('Table 3', 'Ablation of layers and widths',
        'Removing layers 3,4,6,7 is far worse than removing either pair; fc width matters little; '
        'wider middle conv layers help.',
        command='ablation', step='table3', result='ablation.json'),
    Section('Tables 4/5, Fig. 9', 'Transfer: fixed layers 1-7 and a new softmax',
        'Caltech-101: 83.8 / 86.5% with 15 / 30 images per class pretrained vs 22.8 / 46.5% from '
        'scratch; pretrained features stay strong down to a few images per class. Here: a model '
        'pretrained on Fashion-MNIST classes A (T-shirt/top, Trouser, Coat, Sandal, Ankle boot) transferred '
        'to the disjoint classes B (Pullover, Dress, Shirt, Sneaker, Bag), the analogue of ImageNet -> '
        'Caltech-101 (Yosinski et al. 2014).',
        command='transfer', step='tables4-5', result='transfer.json'),
    Section('Tables 4/5 control', 'Far-domain control: the Fashion-MNIST model transferred to 8x8 digits',
        'Not in the paper, which transfers to related object classes: the same protocol to a kind of image '
        'the features never saw, to tell what the analogue above owes to the relation between A and B.',
        command='transfer', step='tables4-5-digits', result='transfer.json'),
    Section('Table 6', 'PASCAL VOC 2012',
        '20-way softmax on the pretrained features: 79.0% mean AP, competitive with the best of 2012.',
        offline=OFFLINE['Table 6']),
    Section('Table 7', 'Features of each layer with a linear SVM or softmax',
        'Accuracy rises steadily with depth (Caltech-101 SVM: 44.8% at layer 1 to 85.5% at layer 7). Here: '
        'the model pretrained on classes A, probed on the classes B.',
        command='layer_features', step='table7', result='layers.json'),
    Section('Table 7 control', 'Far-domain control: per-layer features of the Fashion-MNIST model on 8x8 digits',
        'Not in the paper: the per-layer probes on a kind of image the features never saw.',
        command='layer_features', step='table7-digits', result='layers.json'),
]

BY_STEP = {s.step: s for s in SECTIONS if s.step}
