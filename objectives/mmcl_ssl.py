"""MMCL+SSL: the study's and CleanCLIP's objective, lambda1 * MMCL (un-augmented views) + lambda2 * SSL."""
from objectives.base import WeightedSum
from objectives.mmcl import MMCL
from objectives.ssl import SSL


def mmcl_ssl(mmcl: float, ssl: float) -> WeightedSum:
    return WeightedSum({"mmcl": (mmcl, MMCL()), "ssl": (ssl, SSL())}, name="mmcl_ssl")
