"""lovasz_jax: exact, jit-ready Lovász losses for JAX.

The Lovász-Softmax loss, the Lovász sigmoid and the Lovász hinge of Berman,
Rannen Triki & Blaschko (CVPR 2018) as pure JAX functions, with mIoU metrics.
"""

from lovasz_jax._binary import HINGE_STATIC_ARGNAMES as HINGE_STATIC_ARGNAMES
from lovasz_jax._binary import lovasz_hinge as lovasz_hinge
from lovasz_jax._binary import lovasz_sigmoid as lovasz_sigmoid
from lovasz_jax._binary import SIGMOID_STATIC_ARGNAMES as SIGMOID_STATIC_ARGNAMES
from lovasz_jax._cpu import CPU_CUSTOM_CALL_TARGETS as CPU_CUSTOM_CALL_TARGETS
from lovasz_jax._extension import lovasz_grad as lovasz_grad
from lovasz_jax._losses import lovasz_softmax as lovasz_softmax
from lovasz_jax._losses import SOFTMAX_STATIC_ARGNAMES as SOFTMAX_STATIC_ARGNAMES
from lovasz_jax._metrics import confusion_matrix as confusion_matrix
from lovasz_jax._metrics import iou_per_class as iou_per_class
from lovasz_jax._metrics import mean_iou as mean_iou
from lovasz_jax._streaming import IoUState as IoUState

__version__ = "0.2.0"

__all__ = [
    "CPU_CUSTOM_CALL_TARGETS",
    "HINGE_STATIC_ARGNAMES",
    "SIGMOID_STATIC_ARGNAMES",
    "SOFTMAX_STATIC_ARGNAMES",
    "IoUState",
    "confusion_matrix",
    "iou_per_class",
    "lovasz_grad",
    "lovasz_hinge",
    "lovasz_sigmoid",
    "lovasz_softmax",
    "mean_iou",
]
