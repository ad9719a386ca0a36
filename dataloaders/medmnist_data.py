"""MedMNIST 2D single-label data sets, read from ``<data_root>/<flag>[_<size>].npz``.

The names and class names are listed here, so that registering the sets and reading a file never imports the
``medmnist`` package (slow; absent on a bare GPU machine). Downloading (``download: true``) goes through
medmnist's own code (URL and MD5 from ``medmnist.INFO``), imported only then; reading goes through the shared
``.npz`` reader. tests/dataloaders/test_dataloaders.py checks these tables against ``medmnist.INFO``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dataloaders.image_set import DataSplits
from dataloaders.npz_data import read_npz
from dataloaders.registry import Loader, register_dataset
from experiment.config import Config, expand_path
from experiment.errors import DataError, import_optional

log = logging.getLogger(__name__)

ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
          "lung-right", "pancreas", "spleen")  # fmt: skip
# Every 2D flag whose task is single-label (ChestMNIST is multi-label: not class-incremental), in medmnist.INFO's
# order, with INFO[flag]["label"] as a tuple: class c is named CLASS_NAMES[flag][c].
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "pathmnist": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
                  "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
    "dermamnist": ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("0", "1", "2", "3", "4"),
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": ("basophil", "eosinophil", "erythroblast",
                   "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"),
    "tissuemnist": ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
                    "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
                    "Thick Ascending Limb"),
    "organamnist": ORGANS,
    "organcmnist": ORGANS,
    "organsmnist": ORGANS,
}  # fmt: skip
FLAGS = tuple(CLASS_NAMES)
URL = "https://zenodo.org/records/10519652/files/{file}?download=1"  # MedMNIST v3 (medmnist.INFO's url, url_<size>)


def file_name(flag: str, size: int) -> str:
    """MedMNIST's file naming: ``bloodmnist.npz`` for 28 px, ``bloodmnist_64.npz`` for other sizes."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def file_path(cfg: Config, flag: str) -> Path:
    """The file a MedMNIST data set reads: ``<data_root>/<flag>[_<size>].npz`` at ``medmnist_size``."""
    return expand_path("data_root", cfg.data_root) / file_name(flag, cfg.medmnist_size)


def download(flag: str, root: Path, size: int) -> None:
    """Fetch the file with medmnist's own download code (checks the MD5); medmnist is imported only here."""
    url = URL.format(file=file_name(flag, size))
    medmnist = import_optional("medmnist", "medmnist", f"{flag}: downloading", f"fetch {url} into {root}/", DataError)
    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (size %d) into %s", flag, size, root)
    dataset_class = getattr(medmnist, medmnist.INFO[flag]["python_class"])
    try:
        dataset_class(split="val", download=True, root=str(root), size=size)  # "val": the smallest split to open
    except RuntimeError as err:
        first = " ".join(str(err).split())[:200]
        raise DataError(f"{flag}: download of {url} into {root}/ failed ({first}); fetch it by hand") from None


def load_medmnist(cfg: Config, flag: str) -> DataSplits:
    """One MedMNIST data set at ``medmnist_size`` px, class names from ``CLASS_NAMES`` (medmnist's labels)."""
    path = file_path(cfg, flag)
    if not path.is_file():
        if not cfg.download:
            url = URL.format(file=path.name)
            raise DataError(
                f"{flag}: file {path} not found; set download: true (or --download=true) or fetch {url} into "
                f"{path.parent}/"
            )
        download(flag, path.parent, cfg.medmnist_size)
    return read_npz(path, flag, list(CLASS_NAMES[flag]))


def _loader(flag: str) -> Loader:
    def load(cfg: Config) -> DataSplits:
        return load_medmnist(cfg, flag)

    load.__name__ = f"load_{flag}"
    load.__doc__ = f"MedMNIST {flag}."
    return load


for _flag in FLAGS:
    register_dataset(_flag, files=lambda cfg, flag=_flag: [file_path(cfg, flag)])(_loader(_flag))
