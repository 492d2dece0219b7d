"""Local vs synchronized batch normalization on tiny per-process batches.

Runs ``train.py`` three times on the same data, every run with a global
batch of 8 images and the same number of iterations::

    mpiexec -n 4 python -m mpi4py train.py --bn local --batchsize 2
    mpiexec -n 4 python -m mpi4py train.py --bn multinode --batchsize 2
    python train.py --bn local --batchsize 8        # reference

then plots the validation accuracy per epoch of the three runs into
``OUT/demo.png`` and prints the final accuracies. ``--seeds 1 2 3`` repeats
everything for several seeds (a table column per seed, and the mean).

Usage (``make demo`` runs the first line)::

    .venv/bin/python examples/run_demo.py --out result
    .venv/bin/python examples/run_demo.py --out result --seeds 1 2 3

The MPI launcher is the ``mpiexec`` next to the Python interpreter (the
virtual environment's MPICH); Open MPI is told to allow more ranks than
cores.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, 'train.py')

# (key, label, processes, bn, batch size per process)
SETTINGS = (
    ('local', 'local BN, {n} processes x 2', None, 'local', 2),
    ('multinode', 'multinode BN, {n} processes x 2', None, 'multinode', 2),
    ('single', 'local BN, 1 process x {b} (reference)', 1, 'local', None),
)


def find_mpiexec():
    """The ``mpiexec`` beside ``sys.executable``, else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which('mpiexec')
    if found is None:
        sys.exit('run_demo.py: no mpiexec next to {} nor on PATH; install '
                 'MPI (make install puts MPICH into .venv)'.format(
                     sys.executable))
    return found


def mpiexec_command(mpiexec, n):
    command = [mpiexec, '-n', str(n)]
    version = subprocess.run([mpiexec, '--version'], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True)
    if 'Open MPI' in version.stdout or 'OpenRTE' in version.stdout:
        # The demo runs more ranks than a small machine has cores.
        command.append('--oversubscribe')
    return command


def run_setting(setting, seed, args, mpiexec):
    key, label, processes, bn, batchsize = setting
    processes = processes or args.processes
    batchsize = batchsize or 2 * args.processes
    out = os.path.join(args.out, 'seed{}'.format(seed), key)
    os.makedirs(out, exist_ok=True)
    command = [sys.executable]
    if processes > 1:
        command = (mpiexec_command(mpiexec, processes)
                   + [sys.executable, '-m', 'mpi4py'])
    command += [TRAIN, '--bn', bn, '--batchsize', str(batchsize),
                '--epoch', str(args.epoch), '--seed', str(seed),
                '--out', out, '--no-progress']
    if args.no_fc_bn:
        command.append('--no-fc-bn')
    log_path = out + '.log'
    start = time.time()
    with open(log_path, 'w') as log:
        log.write(' '.join(command) + '\n')
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    label = label.format(n=processes, b=batchsize)
    if code != 0:
        with open(log_path) as log:
            tail = log.readlines()[-20:]
        sys.exit('run_demo.py: {} (seed {}) failed with exit status {}; '
                 'last lines of {}:\n{}'.format(
                     label, seed, code, log_path, ''.join(tail)))
    with open(log_path) as log:
        # Each process's own line per epoch shows the link at work on
        # every rank.
        for line in log:
            if line.startswith('rank '):
                print('    ' + line.rstrip())
    with open(os.path.join(out, 'accuracy.json')) as f:
        result = json.load(f)
    result.update(label=label, seconds=seconds, log=log_path)
    print('seed {}  {:<40s} {:6.1f} s  final accuracy {:.3f}'.format(
        seed, label, seconds, result['validation_accuracy'][-1]), flush=True)
    return result


def plot(results, seeds, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    colors = {'local': 'tab:red', 'multinode': 'tab:blue',
              'single': 'black'}
    styles = {'local': '-', 'multinode': '-', 'single': '--'}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, _, _, _, _ in SETTINGS:
        runs = [results[seed][key] for seed in seeds]
        epochs = runs[0]['epoch']
        mean = [sum(r['validation_accuracy'][i] for r in runs) / len(runs)
                for i in range(len(epochs))]
        if len(runs) > 1:
            for r in runs:
                ax.plot(r['epoch'], r['validation_accuracy'],
                        color=colors[key], linestyle=styles[key],
                        alpha=0.25, linewidth=1)
        label = runs[0]['label']
        if len(runs) > 1:
            label += ' (mean of {})'.format(len(runs))
        ax.plot(epochs, mean, color=colors[key], linestyle=styles[key],
                marker='o', linewidth=2, label=label)
    ax.axhline(0.25, color='gray', linewidth=0.8, linestyle=':')
    ax.text(0.01, 0.21, 'chance (4 classes)', color='gray', fontsize=8,
            transform=ax.get_yaxis_transform())
    ax.set_xlabel('epoch')
    ax.set_ylabel('validation accuracy')
    ax.set_ylim(0, 1.02)
    ax.set_xticks(results[seeds[0]]['single']['epoch'])
    ax.set_title('Global batch of 8 images; evaluation with running '
                 'statistics', fontsize=10)
    ax.legend(loc='lower right', fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results, seeds):
    header = '{:<40s}'.format('final validation accuracy') + ''.join(
        '{:>9s}'.format('seed {}'.format(s)) for s in seeds)
    if len(seeds) > 1:
        header += '{:>9s}'.format('mean')
    print(header)
    print('-' * len(header))
    for key, _, _, _, _ in SETTINGS:
        finals = [results[s][key]['validation_accuracy'][-1] for s in seeds]
        row = '{:<40s}'.format(results[seeds[0]][key]['label']) + ''.join(
            '{:9.3f}'.format(a) for a in finals)
        if len(seeds) > 1:
            row += '{:9.3f}'.format(sum(finals) / len(finals))
        print(row)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='result')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1])
    parser.add_argument('--epoch', type=int, default=4)
    parser.add_argument('--processes', type=int, default=4,
                        help='MPI processes of the two multi-process runs')
    parser.add_argument('--no-fc-bn', action='store_true',
                        help='train the model without bn5 (see train.py)')
    args = parser.parse_args(argv)

    mpiexec = find_mpiexec()
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    results = {}
    for seed in args.seeds:
        results[seed] = {setting[0]: run_setting(setting, seed, args, mpiexec)
                         for setting in SETTINGS}
    total = time.time() - start

    png = os.path.join(args.out, 'demo.png')
    plot(results, args.seeds, png)
    with open(os.path.join(args.out, 'demo.json'), 'w') as f:
        json.dump({str(s): r for s, r in results.items()}, f, indent=1)
    print()
    print_table(results, args.seeds)
    print()
    print('{} runs in {:.0f} s; wrote {} and {}'.format(
        len(SETTINGS) * len(args.seeds), total, png,
        os.path.join(args.out, 'demo.json')))


if __name__ == '__main__':
    main()
