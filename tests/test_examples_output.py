"""The example's output: only rank 0 writes, and each line in one write, so
that lines of different processes never interleave in mpiexec's output."""

import os
import sys

import chainermn
import pytest
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'examples'))
import train  # NOQA: E402  (examples/train.py)


class RecordingStream(object):
    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_whole_lines_passes_each_batch_of_lines_in_one_write():
    stream = RecordingStream()
    out = train.WholeLines(stream)
    for piece in ('\033[J', 'epoch', '  1.5', '\n', 'next', ' row\nhalf'):
        out.write(piece)
    out.flush()
    assert stream.writes == ['\033[Jepoch  1.5\n', 'next row\n']


@pytest.mark.parallel(nprocs=[2, 3])
def test_every_rank_line_is_printed_by_rank_0_in_rank_order(capfd):
    comm = chainermn.create_communicator('naive')
    capfd.readouterr()
    train.print_on_rank_0(comm, 'rank {} says {}'.format(
        comm.rank, 'x' * comm.rank))
    out = capfd.readouterr().out
    printed = MPI.COMM_WORLD.allgather(out)
    assert printed[0] == ''.join('rank {} says {}\n'.format(r, 'x' * r)
                                 for r in range(comm.size))
    assert printed[1:] == [''] * (comm.size - 1)
