"""Local vs synchronized batch normalization on tiny per-process batches.

Trains ``train.py`` (scikit-learn's handwritten digits; batch normalization
after each convolution) three times per seed, every run with a global batch
of 8 images and the same number of iterations::

    mpiexec -n 4 python -m mpi4py train.py --bn local --batchsize 2
    mpiexec -n 4 python -m mpi4py train.py --bn multinode --batchsize 2
    python train.py --bn local --batchsize 8        # reference

Each run's output is shown as it comes, every line prefixed with its
setting. At the end it plots the validation accuracy per epoch of every run
into ``OUT/demo.png``, evaluated with the running averages of the statistics
and with exact population statistics
(:func:`multinode_bn.update_population_statistics`), and prints tables of
the final accuracies (a column per seed, and their mean).

Usage (``make demo`` runs the first line; ``make demo DEMO_ARGS='--seeds 1 2
3'`` the second, which made the figure and tables of the documentation)::

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

# One seed's three runs took 42 s to 4 min 12 s on a 2-core machine shared
# with other jobs, the busier the longer.
MINUTES_PER_SEED = (1, 4)

# (key, label, processes, bn, batch size per process); None: --processes,
# and for the reference 2 images times --processes.
SETTINGS = (
    ('local', 'local BN, {n} processes x 2 images', None, 'local', 2),
    ('multinode', 'synchronized BN, {n} processes x 2 images', None,
     'multinode', 2),
    ('single', 'reference: 1 process x {b} images', 1, 'local', None),
)
SHORT = {'local': 'local', 'multinode': 'sync', 'single': 'ref'}


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
    """Runs one setting, showing its output line by line as it comes."""
    key, label, processes, bn, batchsize = setting
    processes = processes or args.processes
    batchsize = batchsize or 2 * args.processes
    label = label.format(n=processes, b=batchsize)
    out = os.path.join(args.out, 'seed{}'.format(seed), key)
    os.makedirs(out, exist_ok=True)
    command = [sys.executable]
    if processes > 1:
        command = (mpiexec_command(mpiexec, processes)
                   + [sys.executable, '-m', 'mpi4py'])
    command += [TRAIN, '--bn', bn, '--batchsize', str(batchsize),
                '--epoch', str(args.epoch), '--seed', str(seed),
                '--out', out, '--no-progress']
    print('--- seed {}: {}'.format(seed, label), flush=True)
    prefix = '[{} s{}] '.format(SHORT[key], seed)
    log_path = out + '.log'
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    start = time.time()
    with open(log_path, 'w') as log:
        log.write(' '.join(command) + '\n')
        proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env,
                                universal_newlines=True)
        for line in proc.stdout:
            log.write(line)
            # PrintReport clears the terminal line before each row.
            line = line.replace('\033[J', '').rstrip()
            if line:
                print(prefix + line, flush=True)
        code = proc.wait()
    seconds = time.time() - start
    if code != 0:
        sys.exit('run_demo.py: {} (seed {}) failed with exit status {}; its '
                 'output is in {}'.format(label, seed, code, log_path))
    with open(os.path.join(out, 'accuracy.json')) as f:
        result = json.load(f)
    result.update(label=label, seconds=seconds, log=log_path)
    print('--- seed {}: {}: {:.0f} s, final validation accuracy {:.3f} '
          '(running averages), {:.3f} (population statistics)'.format(
              seed, label, seconds, result['validation_accuracy'][-1],
              result['population_accuracy'][-1]), flush=True)
    return result


COLORS = {'local': 'tab:red', 'multinode': 'tab:blue', 'single': 'black'}
STYLES = {'local': '-', 'multinode': '-', 'single': '--'}


# What the validation accuracy was measured with: the running averages of
# the statistics (Chainer's evaluation mode), or exact population statistics
# of the training images (multinode_bn.update_population_statistics).
EVALUATIONS = (
    ('validation_accuracy', 'running averages'),
    ('population_accuracy', 'population statistics'),
)
TITLES = {
    'validation_accuracy': "evaluated with the running averages\n(Chainer's "
                           "evaluation mode)",
    'population_accuracy': 'evaluated with exact population statistics\n'
                           '(multinode_bn.update_population_statistics)',
}


def plot(results, seeds, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    lowest = 1.0
    for ax, (field, evaluation) in zip(axes, EVALUATIONS):
        for key, _, _, _, _ in SETTINGS:
            runs = [results[seed][key] for seed in seeds]
            epochs = runs[0]['epoch']
            mean = [sum(r[field][i] for r in runs) / len(runs)
                    for i in range(len(epochs))]
            for r in runs:
                lowest = min(lowest, min(r[field]))
                if len(runs) > 1:
                    ax.plot(r['epoch'], r[field], color=COLORS[key],
                            linestyle=STYLES[key], alpha=0.25, linewidth=1)
            label = runs[0]['label']
            if len(runs) > 1:
                label += ' (mean of {} seeds)'.format(len(runs))
            ax.plot(epochs, mean, color=COLORS[key], linestyle=STYLES[key],
                    marker='o', linewidth=2, label=label)
        ax.set_xlabel('epoch')
        ax.set_xticks(results[seeds[0]]['single']['epoch'])
        ax.set_title(TITLES[field], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('validation accuracy')
    axes[0].set_ylim(max(0.0, lowest - 0.03), 1.0)
    axes[1].legend(loc='lower right', fontsize=8.5)
    fig.suptitle('Handwritten digits (scikit-learn, 8x8), global batch of 8, '
                 'batch normalization after each convolution', fontsize=10.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(results, seeds):
    for field, evaluation in EVALUATIONS:
        header = '{:<42s}'.format('final accuracy, ' + evaluation) + ''.join(
            '{:>9s}'.format('seed {}'.format(s)) for s in seeds)
        if len(seeds) > 1:
            header += '{:>9s}'.format('mean')
        print(header)
        print('-' * len(header))
        for key, _, _, _, _ in SETTINGS:
            finals = [results[s][key][field][-1] for s in seeds]
            row = '{:<42s}'.format(results[seeds[0]][key]['label']) + ''.join(
                '{:9.3f}'.format(a) for a in finals)
            if len(seeds) > 1:
                row += '{:9.3f}'.format(sum(finals) / len(finals))
            print(row)
        print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='result')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1])
    parser.add_argument('--epoch', type=int, default=4)
    parser.add_argument('--processes', type=int, default=4,
                        help='MPI processes of the two multi-process runs')
    args = parser.parse_args(argv)

    mpiexec = find_mpiexec()
    os.makedirs(args.out, exist_ok=True)
    low, high = (m * len(args.seeds) for m in MINUTES_PER_SEED)
    print('{} runs ({} settings x {} seed(s)); {} to {} minutes on 2 cores, '
          'the busier the longer. Each line is prefixed with its setting '
          '(local, sync, ref) and seed.'.format(
              len(SETTINGS) * len(args.seeds), len(SETTINGS),
              len(args.seeds), low, high), flush=True)
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
    print('{} runs in {:.0f} s; wrote {} and {}'.format(
        len(SETTINGS) * len(args.seeds), total, png,
        os.path.join(args.out, 'demo.json')))


if __name__ == '__main__':
    main()
