"""A TCP proxy that a fault test stops and starts: MLflow "down" for one
private stack's jobs (their relays reach MLflow through it, M2D_MLFLOW_JOB_URL)
while the testbed's shared MLflow server keeps running for everyone else.

    python tests/helpers/tcp_proxy.py --listen PORT --to HOST:PORT [--host ADDRESS]

(--host "" listens on every address: the compute nodes reach it by this host's
address on their bridge, on a port the testbed lets them reach.)

Stopping the process closes every connection through it at once, as a
server that died would; new ones are refused until it is started again.
"""
import argparse
import socket
import sys
import threading
from pathlib import Path

# run as a script, by path, as the relay itself is
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "singularity"))
from relay import pump  # noqa: E402 - the relay's own byte pump, both ways closed together


def serve(client: socket.socket, to: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(to, timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    back.start()
    pump(client, upstream)
    back.join()
    upstream.close()
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--to", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    host, _, port = args.to.rpartition(":")
    listener = socket.create_server((args.host, args.listen))
    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, args=(client, (host, int(port))), daemon=True).start()


if __name__ == "__main__":
    main()
