"""Shared test helpers: builders of inputs (synthetic X-rays, image folders, DICOMs, tiny model
folders), train_hf arguments and a raw Gradio HTTP client. Test files import from here, never
from each other or from benchmarks/."""

from __future__ import annotations

import io
import os
from pathlib import Path

import math

import numpy as np
import torch
from PIL import Image

from cxr_train.synthetic import make_xray, write_kermany_folder  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parent.parent
ID2LABEL = {0: "NORMAL", 1: "PNEUMONIA"}


def subprocess_env(**extra) -> dict:
    """Environment for a child Python: offline, and this checkout's code first on the path
    (whether or not the package is also installed)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def base_args(data, out, *extra):
    """train_hf.py arguments for a 2-step run of a tiny model."""
    return ["--model_name_or_path", "tiny-resnet-scratch", "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
            "--validation_fraction", "0.25", "--logging_steps", "1", "--learning_rate", "1e-3",
            "--disable_tqdm", "True", *extra]


def tiny_timm_folder(tmp_path: Path, architecture: str = "test_resnet", size: int = 64) -> Path:
    """A timm checkpoint folder as the Hub has them (TimmWrapper config + pretrained_cfg),
    built offline from timm's own test architectures (random weights) at ``size`` pixels."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, TimmWrapperImageProcessor

    from cxr_train.modeling import save_model_folder

    model_args = {"img_size": size} if architecture.startswith(("test_vit", "test_maxvit")) else None
    cfg = TimmWrapperConfig(architecture=architecture, num_labels=1000, model_args=model_args,
                            pretrained_cfg={"input_size": [3, size, size], "mean": [0.485, 0.456, 0.406],
                                            "std": [0.229, 0.224, 0.225], "crop_pct": 1.0,
                                            "interpolation": "bilinear", "num_classes": 1000})
    model = TimmWrapperForImageClassification(cfg)
    proc = TimmWrapperImageProcessor(pretrained_cfg=cfg.pretrained_cfg)
    folder = tmp_path / f"timm-{architecture}"
    save_model_folder(model, proc, folder)
    return folder


# ----------------------------------------------------------------- DICOM with patient data

PHI = ("Doe^Jane", "PHI-12345", "19700101", "ACC-98765", "St Elsewhere")



def make_dicom(pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2",
               preamble: bool = True, **attrs) -> bytes:
    """Uncompressed 16-bit greyscale DICOM (12 bits stored) carrying PHI, as bytes."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI[0], PHI[1], PHI[2]
    ds.AccessionNumber, ds.InstitutionName = PHI[3], PHI[4]
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.PixelData = pixels.astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    if preamble:
        ds.save_as(buf, enforce_file_format=True)
    else:  # no preamble, no file meta: a bare implicit-VR dataset
        del ds.file_meta
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def xrays(seeds, size=96):
    return [make_xray(s, s % 2 == 0, size=size).convert("RGB") for s in seeds]


def greyscale_photo(seed=0, size=128) -> Image.Image:
    """A greyscale 'portrait': face-like ellipse, hair, background gradient (not an X-ray)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    img = 200 - 120 * yy + 15 * np.sin(20 * xx)
    face = ((xx - 0.5) / 0.22) ** 2 + ((yy - 0.5) / 0.3) ** 2 <= 1
    img[face] = 170
    img[(yy < 0.3) & (np.abs(xx - 0.5) < 0.25)] = 40
    img += rng.normal(0, 5, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").convert("RGB")


def make_model_folder(out: Path, *, p_positive: float | None = None, threshold: float = 0.5,
                      ood: bool = True, name_seed: int = 0) -> Path:
    """A tiny ResNet folder. With ``p_positive`` the head is set so that every film gets about that
    probability of PNEUMONIA (weights scaled down, bias chosen), while its Grad-CAM map stays a
    real, non-constant map. With ``ood`` an OOD scorer is fitted on synthetic X-rays."""
    from cxr_train.modeling import build_preset, save_model_folder
    from cxr_train.ood_fit import fit_ood, synthetic_ct_slice, synthetic_photo

    torch.manual_seed(name_seed)
    model, processor = build_preset("tiny-resnet-scratch", {0: "NORMAL", 1: "PNEUMONIA"})
    if p_positive is not None:
        lin = model.classifier[-1]
        with torch.no_grad():
            lin.weight.mul_(1e-3)
            lin.bias.copy_(torch.tensor([0.0, math.log(p_positive / (1 - p_positive))]))
    model.config.cxr_operating_point = {"threshold": threshold, "temperature": 1.0, "positive_label": "PNEUMONIA",
                                        "source": "set by the test"}
    model.config.cxr_training = {"base_model": "tiny-resnet-scratch", "strategy": "full",
                                 "validation_metrics": {"roc_auc": 0.9},
                                 # the shapes train_hf.py writes (CardFacts.config_summary)
                                 "cv_metrics": {"k": 5, "roc_auc": {"mean": 0.91, "sd": 0.02}},
                                 "external_metrics": {"n": 16, "roc_auc": 0.87}}
    save_model_folder(model, processor, out)
    if ood:
        scorer = fit_ood(model.eval(), processor, xrays(range(40)), xrays(range(100, 120)),
                         images_ood=[synthetic_ct_slice(s) for s in range(4)] + [synthetic_photo(s) for s in range(4)])
        scorer.save(out)
    return out


def stored_upload(tmp_path, name: str) -> str:
    """A file as the upload route stores it: in the app's cache folder, registered (files.uploaded_path)."""
    from app import files

    jan = files.janitor()
    folder = jan.root / f"test-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes((tmp_path / name).read_bytes())
    jan.register_upload([str(folder / name)])
    return str(folder / name)
