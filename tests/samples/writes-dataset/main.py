# The dataset is mounted read-only: this write must fail.
with open("/mnt/dataset/tampered.txt", "w") as f:
    f.write("should never land")
