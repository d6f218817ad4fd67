"""Sample: an image-level ResNet-18 breast cancer classifier on CLaM.

Every image gets its case's label (CaseLabel: malignant or benign). The model
trains on the Split=train images, is evaluated on Split=test after each epoch,
and logs to MLflow: train loss and accuracy per epoch, test AUC, F1, accuracy
and Cohen's kappa. The trained model goes to /mnt/export/model.tar: MLflow keeps
no artifacts on the platform, so the export folder is the only way out.

`predict` below is the prediction entry point m2d.toml declares: the disclosure
report calls it after the job, with the export folder and image paths, to test
whether the model gives its training cases away (docs/researchers.md).

Plain PyTorch: the ResNet-18 is written out below (same layer names as
torchvision's, so its ImageNet weights load). It starts from those weights when
a file resnet18-*.pth is in $TORCH_HOME/hub/checkpoints (jobs cannot download),
from random weights otherwise.

Settings, from the environment:
  EPOCHS                  training epochs (default 2)
  M2D_DRY_RUN=1           one epoch of two small batches on small images: checks the
                          code runs, says nothing about the model
  MLFLOW_TRACKING_URI     set by the platform (and by `m2d run`); unset, metrics go
                          to ./mlruns
  MLFLOW_EXPERIMENT_NAME  set by the platform: your MLflow username
  M2D_DATASET_DIR, M2D_EXPORT_DIR  only where /mnt/dataset and /mnt/export cannot
                          exist (`m2d run` says when)
"""

import csv
import glob
import json
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score
from torch import nn

DATASET = Path(os.environ.get("M2D_DATASET_DIR", "/mnt/dataset"))
EXPORT = Path(os.environ.get("M2D_EXPORT_DIR", "/mnt/export"))
DRY_RUN = os.environ.get("M2D_DRY_RUN", "").lower() in ("1", "true", "yes")
EPOCHS = 1 if DRY_RUN else int(os.environ.get("EPOCHS", "2"))
BATCHES_PER_EPOCH = 2 if DRY_RUN else None  # None: all of them
# Real CLaM images are crops of millions of pixels; this sample shrinks every image
# to one small portrait size. Bigger inputs see smaller lesions and cost more.
INPUT_WIDTH, INPUT_HEIGHT = (64, 80) if DRY_RUN else (256, 320)
BATCH_SIZE = 8
LEARNING_RATE = 1e-3
CLASSES = ["benign", "malignant"]  # index = label; malignant is the positive class
# ImageNet's statistics: what pretrained weights expect
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --- data --------------------------------------------------------------------------


def read_images(split):
    """(png path, label) for every image of `split`, from clam-details-image.csv."""
    with open(DATASET / "clam-details-image.csv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))  # semicolons; missing values are "NULL"
    return [(DATASET / row["ImagePath"], CLASSES.index(row["CaseLabel"]))
            for row in rows if row["Split"] == split]


class Mammograms(torch.utils.data.Dataset):
    """Reads each image when asked (the full dataset does not fit in memory).
    The 8-bit PNG is used here; the 12-bit values are beside it in 1.npy
    (np.load(path.with_suffix('.npy')), uint16 0-4095)."""

    def __init__(self, items, augment):
        self.items, self.augment = items, augment

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        image = Image.open(path).convert("L").resize((INPUT_WIDTH, INPUT_HEIGHT), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        if self.augment and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)  # left and right breasts mirror each other
        # grey to three channels, normalised the way ImageNet weights expect
        channels = torch.stack([(pixels - m) / s for m, s in zip(MEAN, STD)])
        return channels, label


# --- the model: ResNet-18 (He et al. 2015), torchvision's layer names ---------------


class BasicBlock(nn.Module):
    def __init__(self, inputs, outputs, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                                            nn.BatchNorm2d(outputs))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.relu(x + shortcut)


class ResNet18(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64, 1), BasicBlock(64, 64, 1))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128, 1))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256, 1))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_model():
    """ResNet-18 with a two-class head; ImageNet weights when a file is at hand."""
    model = ResNet18()
    weights = sorted(glob.glob(os.path.join(torch.hub.get_dir(), "checkpoints", "resnet18-*.pth")))
    if weights:
        model.load_state_dict(torch.load(weights[-1], map_location="cpu", weights_only=True))
        print("starting from", weights[-1])
    else:
        print("no resnet18-*.pth in", os.path.join(torch.hub.get_dir(), "checkpoints"),
              "- starting from random weights")
    model.fc = nn.Linear(512, len(CLASSES))
    return model


# --- training and evaluation ------------------------------------------------------


def train_one_epoch(model, loader, optimiser, device):
    model.train()
    loss_function = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    for batch, (images, labels) in enumerate(loader):
        if BATCHES_PER_EPOCH is not None and batch >= BATCHES_PER_EPOCH:
            break
        images, labels = images.to(device), labels.to(device)
        optimiser.zero_grad()
        logits = model(images)
        loss = loss_function(logits, labels)
        loss.backward()
        optimiser.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return {"train_loss": total_loss / seen, "train_accuracy": correct / seen}


@torch.no_grad()
def evaluate(model, loader, device):
    model.eval()
    scores, labels = [], []
    for images, batch_labels in loader:
        probabilities = model(images.to(device)).softmax(1)[:, 1]
        scores.append(probabilities.cpu().numpy())
        labels.append(batch_labels.numpy())
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    predictions = (scores >= 0.5).astype(int)
    metrics = {
        "test_accuracy": accuracy_score(labels, predictions),
        "test_f1": f1_score(labels, predictions, zero_division=0),
        "test_kappa": cohen_kappa_score(labels, predictions),
    }
    if len(set(labels)) == 2:  # AUC needs both classes in the test set
        metrics["test_auc"] = roc_auc_score(labels, scores)
    # kappa is undefined (nan) when both raters use one class only; MLflow wants numbers
    return {name: float(value) for name, value in metrics.items() if np.isfinite(value)}


def main():
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_items, test_items = read_images("train"), read_images("test")
    print(f"{len(train_items)} train and {len(test_items)} test images; device {device}; "
          f"{EPOCHS} epochs{' (dry run)' if DRY_RUN else ''}")
    # num_workers=0: loader processes need shared memory, which a job's container may lack
    train_loader = torch.utils.data.DataLoader(Mammograms(train_items, augment=True),
                                               batch_size=BATCH_SIZE, shuffle=True, drop_last=len(train_items) > BATCH_SIZE)
    test_loader = torch.utils.data.DataLoader(Mammograms(test_items, augment=False), batch_size=BATCH_SIZE)
    model = make_model().to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # Run by hand, outside the platform and `m2d run`: keep the metrics in ./mlruns
        # (MLflow 3 uses a file store only when told to).
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        mlflow.set_tracking_uri(Path("mlruns").resolve().as_uri())
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "clam-resnet18"))
    with mlflow.start_run():
        mlflow.log_params({"epochs": EPOCHS, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE,
                           "input_size": f"{INPUT_WIDTH}x{INPUT_HEIGHT}", "dry_run": DRY_RUN,
                           "device": str(device)})
        for epoch in range(1, EPOCHS + 1):
            started = time.monotonic()
            metrics = train_one_epoch(model, train_loader, optimiser, device)
            metrics |= evaluate(model, test_loader, device)
            mlflow.log_metrics(metrics, step=epoch)
            print(f"epoch {epoch}/{EPOCHS} ({time.monotonic() - started:.0f} s):",
                  ", ".join(f"{name} {value:.3f}" for name, value in metrics.items()))

    EXPORT.mkdir(parents=True, exist_ok=True)
    torch.save({"model": "resnet18", "classes": CLASSES, "input_size": [INPUT_WIDTH, INPUT_HEIGHT],
                "state_dict": model.state_dict()}, EXPORT / "model.tar")
    (EXPORT / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print("saved", EXPORT / "model.tar")


# --- the prediction entry point (m2d.toml) ----------------------------------------


@torch.no_grad()
def predict(export_dir, images):
    """The saved model's probability of malignant for each image path (m2d.toml's
    [disclosure] predict): the disclosure report's membership test calls this with
    the export folder the job wrote and images of both splits. CPU only."""
    saved = torch.load(Path(export_dir) / "model.tar", map_location="cpu", weights_only=True)
    width, height = saved["input_size"]
    model = ResNet18()
    model.fc = nn.Linear(512, len(saved["classes"]))
    model.load_state_dict(saved["state_dict"])
    model.eval()
    malignant = saved["classes"].index("malignant")
    probabilities = []
    for start in range(0, len(images), BATCH_SIZE):
        batch = []
        for path in images[start:start + BATCH_SIZE]:
            image = Image.open(path).convert("L").resize((width, height), Image.BILINEAR)
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            batch.append(torch.stack([(pixels - m) / s for m, s in zip(MEAN, STD)]))
        probabilities += model(torch.stack(batch)).softmax(1)[:, malignant].tolist()
    return probabilities


if __name__ == "__main__":
    main()
