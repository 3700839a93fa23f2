"""Entry point of a tensor-parallel worker process (serve/tensor_parallel.py starts it with two pipe fds)."""

import sys

from qserve.serve.tensor_parallel import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1]), int(sys.argv[2])))
