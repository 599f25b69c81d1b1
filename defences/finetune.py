"""Plain fine-tuning on clean data under an objective: CleanCLIP is MMCL+SSL (lambda1 = lambda2 = 1);
the study also compares MMCL-only and SSL-only cleaning."""
from defences.base import Defence


def cleanclip(mmcl: float, ssl: float) -> Defence:
    return Defence("mmcl_ssl", mmcl=mmcl, ssl=ssl)


def mmcl() -> Defence:
    return Defence("mmcl")


def ssl() -> Defence:
    return Defence("ssl")
