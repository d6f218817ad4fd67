"""The hospital's CLaM sample, in its own structure: the platform's regression test
for code written for the hospital's model-to-data platform, run unchanged.

What makes it "classic" (and what the platform must keep working):
- Python 3.9 (.python-version) and the hospital's pins: mlflow==2.11.3, torch==1.13.0,
  numpy==1.22.4 (requirements.txt);
- ``resnet18(weights=ResNet18_Weights.DEFAULT)``: torchvision looks for
  resnet18-f37072fd.pth in $TORCH_HOME/hub/checkpoints, which the platform points at
  the site's weights cache (jobs cannot download);
- its own stdout and stderr go to /mnt/export/out.txt and error.txt, not the console;
- the researcher fills in the four lines below (MLflow username and password from the
  account page, the tracking URL, the device), and the experiment is named after the
  username: ``mlflow.set_experiment(username)``;
- ``mlflow.start_run()`` without ``with``, params, per-epoch train loss and accuracy
  (``step=epoch``), the test set's AUC, accuracy, F1 and kappa, ``mlflow.end_run()``;
- the model to /mnt/export/model.tar and a results.xlsx beside it.

On the platform none of the four lines matter: the job's MLflow calls go through the
platform's relay with the owner's own login into the owner's experiment (and in the
dry run, on the synthetic twin, into "<username>-dryrun").
"""

import os
import sys

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from PIL import Image
from sklearn import metrics
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.models import ResNet18_Weights, resnet18

# ---- fill in before submitting ------------------------------------------------------
username = ""  # your MLflow username (account page)
password = ""  # your MLflow password (account page)
tracking_uri = "http://localhost:3001/"  # the platform's MLflow URL (account page)
device = "cuda"  # "cpu" where there is no NVIDIA GPU
# --------------------------------------------------------------------------------------

dataset_path = "/mnt/dataset"
output_path = "/mnt/export"
max_epochs = 2
batch_size = 8
lr = 0.0001
image_size = (160, 128)  # height, width: tiny, so two epochs run on a CPU
classes = ["benign", "malignant"]


class CLaMImages(Dataset):
    def __init__(self, df, transform):
        self.df = df.reset_index(drop=True)
        self.transform = transform

    def __len__(self):
        return len(self.df)

    def __getitem__(self, idx):
        row = self.df.iloc[idx]
        img = Image.open(os.path.join(dataset_path, row["ImagePath"])).convert("RGB")
        return self.transform(img), classes.index(row["CaseLabel"])


def load_data():
    df = pd.read_csv(os.path.join(dataset_path, "clam-details-image.csv"), sep=";")
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    train_transform = transforms.Compose([transforms.Resize(image_size), transforms.RandomHorizontalFlip(),
                                          transforms.ToTensor(), normalize])
    test_transform = transforms.Compose([transforms.Resize(image_size), transforms.ToTensor(), normalize])
    df_train, df_test = df[df["Split"] == "train"], df[df["Split"] == "test"]
    print("train images:", len(df_train), "test images:", len(df_test))
    print("train labels:", df_train["CaseLabel"].value_counts().to_dict(),
          "test labels:", df_test["CaseLabel"].value_counts().to_dict())
    train_loader = DataLoader(CLaMImages(df_train, train_transform), batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(CLaMImages(df_test, test_transform), batch_size=batch_size, shuffle=False)
    return train_loader, test_loader


def model_def():
    model = resnet18(weights=ResNet18_Weights.DEFAULT)
    model.fc = nn.Linear(model.fc.in_features, len(classes))
    return model.to(device)


def train(model, train_loader, optimizer, criterion):
    for epoch in range(max_epochs):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            output = model(images)
            loss = criterion(output, labels)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * labels.size(0)
            correct += (output.argmax(1) == labels).sum().item()
            seen += labels.size(0)
        train_loss, train_acc = loss_sum / seen, correct / seen
        print(f"epoch {epoch + 1}/{max_epochs}: train loss {train_loss:.4f}, train accuracy {train_acc:.4f}")
        mlflow.log_metrics({"train_loss": train_loss, "train_acc": train_acc}, step=epoch)
    torch.save({"epoch": max_epochs, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()},
               os.path.join(output_path, "model.tar"))


def test(model, test_loader):
    model.eval()
    probabilities, labels_all = [], []
    with torch.no_grad():
        for images, labels in test_loader:
            output = model(images.to(device))
            probabilities.append(torch.softmax(output, dim=1)[:, 1].cpu().numpy())
            labels_all.append(labels.numpy())
    probabilities, labels_all = np.concatenate(probabilities), np.concatenate(labels_all)
    predictions = (probabilities >= 0.5).astype(int)
    results = {"test_auc": metrics.roc_auc_score(labels_all, probabilities),
               "test_acc": metrics.accuracy_score(labels_all, predictions),
               "test_f1": metrics.f1_score(labels_all, predictions, zero_division=0),
               "test_kappa": metrics.cohen_kappa_score(labels_all, predictions)}
    results = {k: float(v) for k, v in results.items() if not np.isnan(v)}
    print("test:", results)
    mlflow.log_metrics(results)
    return results


def results_store_excel(results):
    pd.DataFrame([results]).to_excel(os.path.join(output_path, "results.xlsx"), index=False)


if __name__ == "__main__":
    # everything this script prints goes to the export folder, as in the hospital's sample
    sys.stdout = open(os.path.join(output_path, "out.txt"), "w")
    sys.stderr = open(os.path.join(output_path, "error.txt"), "w")

    os.environ["MLFLOW_TRACKING_USERNAME"] = username
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(username)
    mlflow.start_run()
    mlflow.log_params({"max_epochs": max_epochs, "batch_size": batch_size, "lr": lr,
                       "image_size": f"{image_size[0]}x{image_size[1]}", "device": device})

    torch.manual_seed(8)
    train_loader, test_loader = load_data()
    model = model_def()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    train(model, train_loader, optimizer, criterion)
    results_store_excel(test(model, test_loader))
    mlflow.end_run()
    print("done")
    sys.stdout.close()
    sys.stderr.close()
