"""make test's worker count (tests/helpers/workers.py): from the nodes of
Slurm's default partition, each counted once whatever other partitions it is
in, bounded by cores and memory."""
from .helpers.workers import parse_sinfo, workers

GIB = 1024**3


def test_each_node_of_the_default_partition_counts_once_with_its_cpus_and_gpus():
    listing = ("node1|2|gpu:fake:1|debug*\nnode2|2|gpu:fake:1|debug*\nnode1|2|gpu:fake:1|node1\n"
               "node2|2|gpu:fake:1|node2\nnode3|2|gpu:fake:1|node3\n"
               "big|8|gpu:a100:2(S:0),gpu:v100:1|debug*\ncpu|4|(null)|debug*\n")
    assert parse_sinfo(listing) == [("node1", 2, 1), ("node2", 2, 1), ("big", 8, 3), ("cpu", 4, 0)]


def test_two_workers_per_cpu_slot_within_two_per_core_and_the_memory():
    one_node, two_nodes = [("vm", 2, 1)], [("node1", 2, 1), ("node2", 2, 1)]
    assert workers(one_node, cores=2, memory=16 * GIB) == 4  # two per slot, two per core
    assert workers(two_nodes, cores=1, memory=16 * GIB) == 2  # two per core
    assert workers(two_nodes, cores=2, memory=16 * GIB) == 4
    assert workers(two_nodes, cores=8, memory=16 * GIB) == 8  # two per slot
    assert workers(two_nodes, cores=8, memory=6 * GIB) == 3  # 2 GiB a worker
    assert workers([], cores=2, memory=16 * GIB) == 2  # no Slurm answered: the floor
