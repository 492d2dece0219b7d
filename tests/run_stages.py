"""Runs the test suite in stages: 1 process, then 2 and 3 MPI processes.

``make test`` calls this. Every process's pytest output goes to its own file
under ``logs/`` (``logs/np1.log``, ``logs/np2-rank0.log``, ...); rank 0's
output (pytest's ``-q`` progress and summary) is also shown as it comes. A
failing rank other than 0 gets its summary shown too. The last line gives
the verdict of all stages; the exit status is non-zero if any stage failed.

Usage::

    python tests/run_stages.py [--logs DIR] [--mpiexec PATH] [PATH...]

(``PATH``: test files or folders, ``tests`` by default.)

Internally, each MPI process runs ``python tests/run_stages.py --rank-log
PATTERN -- COMMAND...``, which writes ``COMMAND``'s output to its rank's file.
"""

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PYTEST = [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-q',
          '--no-header', '-r', 'fEs']
# A hang is cut by pytest-timeout's thread method, which ends the process
# and with it the job.
MPI_FLAGS = ['--timeout=240', '--timeout-method=thread']
STAGES = ((1, 'parallel[1]'), (2, 'parallel[2]'), (3, 'parallel[3]'))

# Rank of this process as the usual launchers tell it, before MPI_Init.
RANK_VARIABLES = ('PMI_RANK', 'OMPI_COMM_WORLD_RANK', 'PMIX_RANK',
                  'MV2_COMM_WORLD_RANK', 'SLURM_PROCID')

SUMMARY = re.compile(r'^=* ?(\d+ (passed|failed|errors?|skipped|deselected)'
                     r'.*?) in [\d.]+s.*$')


def launcher_rank():
    for name in RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return 0


def run_logged(command, log_path, echo):
    """Runs ``command``, its output to ``log_path`` (and the screen)."""
    with open(log_path, 'w') as log:
        # close_fds=False: MPI launchers hand the process a descriptor
        # (PMI_FD) that MPI_Init in the child must still find open.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, close_fds=False,
                                universal_newlines=True)
        for line in iter(proc.stdout.readline, ''):
            log.write(line)
            log.flush()
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
        log.write('[exit status {}]\n'.format(code))
    return code


def rank_main(pattern, command):
    rank = launcher_rank()
    return run_logged(command, pattern.format(rank=rank), echo=rank == 0)


def summary_of(log_path):
    """pytest's last summary line in a log, or why there is none."""
    try:
        with open(log_path) as f:
            lines = f.read().splitlines()
    except OSError:
        return 'no log'
    for line in reversed(lines):
        match = SUMMARY.match(line.strip())
        if match:
            return match.group(1)
    return 'no pytest summary (see {})'.format(os.path.relpath(log_path))


def exit_status_of(log_path):
    try:
        with open(log_path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        match = re.match(r'^\[exit status (-?\d+)\]$', line)
        if match:
            return int(match.group(1))
    return None


def short_summary(log_path):
    """The 'short test summary info' section of a pytest log."""
    with open(log_path) as f:
        text = f.read()
    start = text.rfind('short test summary info')
    if start < 0:
        return text.splitlines()[-15:]
    return text[start:].splitlines()[1:]


def run_stage(n, marker, args):
    test_command = PYTEST + args.paths + ['-m', marker]
    print('=== {} process{}: pytest -m {!r} (each rank\'s output in {}/np{}'
          '{}.log)'.format(n, 'es' if n > 1 else '', marker,
                           os.path.relpath(args.logs), n,
                           '-rank*' if n > 1 else ''), flush=True)
    start = time.time()
    if n == 1:
        log = os.path.join(args.logs, 'np1.log')
        code = run_logged(test_command, log, echo=True)
        logs = [log]
    else:
        pattern = os.path.join(args.logs, 'np{}-rank{{rank}}.log'.format(n))
        code = subprocess.call(
            [args.mpiexec, '-n', str(n), sys.executable,
             os.path.abspath(__file__), '--rank-log', pattern, '--']
            + test_command + MPI_FLAGS)
        logs = [pattern.format(rank=r) for r in range(n)]
        for rank, log in enumerate(logs[1:], 1):
            status = exit_status_of(log)
            if status != 0:
                print('--- rank {} (exit status {}): {}'.format(
                    rank, status, summary_of(log)))
                for line in short_summary(log):
                    print('    ' + line)
    seconds = time.time() - start
    summaries = [summary_of(log) for log in logs]
    # Ranks may warn differently (a warning raised on some ranks only).
    counts = [re.sub(r', \d+ warnings?', '', s) for s in summaries]
    if n == 1:
        words = summaries[0]
    elif all(c == counts[0] for c in counts):
        words = 'every rank: ' + counts[0]
        if counts != summaries:
            words += ' (warnings by rank: {})'.format(', '.join(
                (re.findall(r'(\d+) warnings?', s) or ['0'])[0]
                for s in summaries))
    else:
        words = '; '.join('rank {}: {}'.format(r, s)
                          for r, s in enumerate(summaries))
    return code, '{} process{} {} ({:.0f} s)'.format(
        n, 'es' if n > 1 else '', words, seconds)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--rank-log']:
        if len(argv) < 4 or argv[2] != '--':
            sys.exit('usage: run_stages.py --rank-log PATTERN -- COMMAND...')
        return rank_main(argv[1], argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--logs', default=os.path.join(ROOT, 'logs'))
    parser.add_argument('--mpiexec', default=os.path.join(
        os.path.dirname(sys.executable), 'mpiexec'))
    parser.add_argument('paths', nargs='*', default=['tests'])
    args = parser.parse_args(argv)
    os.makedirs(args.logs, exist_ok=True)
    os.chdir(ROOT)

    results = [run_stage(n, marker, args) for n, marker in STAGES]
    failed = [text for code, text in results if code != 0]
    print()
    for code, text in results:
        print('{} {}'.format('ok    ' if code == 0 else 'FAILED', text))
    if failed:
        print('make test: {} of {} stages FAILED; logs in {}'.format(
            len(failed), len(results), os.path.relpath(args.logs)))
        return 1
    print('make test: all {} stages passed'.format(len(results)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
