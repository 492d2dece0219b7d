#!/usr/bin/env bash
# GPU check of multinode_bn; see docs/gpu.md.
#
#   benchmarks/gpu_check.sh --prepare DIR    # here, with internet: wheels
#   benchmarks/gpu_check.sh [--wheels DIR] [--quick]    # on the GPU machine
#
# The GPU machine has Python 3.12, NumPy 2 and CuPy 14, no Chainer and no
# internet. The run has two steps, so that the first never depends on the
# second:
#
# 1. The CuPy kernels against float64 NumPy, with the machine's own Python,
#    NumPy and CuPy (gpu_check.py --sections kernels). No Chainer.
# 2. The Chainer sections (link, mpi, nccl, timing). Chainer 7.8.1, mpi4py,
#    MPICH and setuptools (for pkg_resources) are installed from the wheels
#    folder into an overlay prefix put first on PYTHONPATH; NumPy and CuPy
#    stay the machine's (CuPy 14 needs NumPy >= 2, so NumPy 1.26 cannot be
#    used with it). gpu_check.py shims what Chainer's import needs on
#    Python 3.12 / NumPy 2 (numpy.distutils, numpy.sctypes), in its own
#    process only. When Chainer still cannot be imported, step 2 reports
#    SKIP with the reason and step 1's result stands.
#
# Outputs go to $OUT (the device runner's folder) or ./gpu_check_out:
# kernels.log/json, chainer.log/json, env.log.
# Exit status: 0 all checks passed, 1 a check failed, 3 no usable GPU.

set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/gpu_check_out}"
WHEELS="${GPU_CHECK_WHEELS:-}"
QUICK=""
PREPARE=""
# GPU_CHECK_DEVICE=cpu: a self-test of this wrapper on a machine without a
# GPU (step 2 runs with NumPy arrays; step 1 then only reports no GPU).
DEVICE="${GPU_CHECK_DEVICE:-gpu}"
# Packages installed into the overlay (all --no-deps: NumPy and CuPy are
# the machine's).
PACKAGES="chainer==7.8.1 mpi4py mpich setuptools<74 six filelock typing_extensions"

while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) PREPARE="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --quick) QUICK="--quick"; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [ -n "$PREPARE" ]; then
    # Run here (Python 3.11 venv of this repository, internet). About 18 MB.
    mkdir -p "$PREPARE"
    PIP="${PIP:-$ROOT/.venv/bin/python -m pip}"
    set -e
    $PIP download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux1_x86_64 -d "$PREPARE" \
        mpi4py==4.1.2 mpich==5.0.2 setuptools==73.0.1 six filelock \
        typing_extensions
    # chainer 7.8.1 is an sdist; its wheel is pure Python.
    $PIP wheel --no-deps --no-build-isolation -w "$PREPARE" chainer==7.8.1
    du -sh "$PREPARE"
    ls -1 "$PREPARE"
    exit 0
fi

mkdir -p "$OUT"
cd "$ROOT"

if [ -z "$WHEELS" ]; then
    for d in "$ROOT/.gpu_wheels" "$ROOT/shared/gpu_wheels"; do
        if [ -d "$d" ]; then WHEELS="$d"; break; fi
    done
fi

{
    echo "== environment"
    date -u
    "$PY" -VV
    "$PY" -c 'import numpy; print("numpy", numpy.__version__)' 2>&1
    "$PY" -c 'import cupy; print("cupy", cupy.__version__); print(cupy.cuda.runtime.getDeviceProperties(0)["name"])' 2>&1 | tail -2
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
    echo "wheels: ${WHEELS:-none}"
    [ -n "$WHEELS" ] && ls -1 "$WHEELS"
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

echo "== step 1: kernels (machine's Python, NumPy, CuPy; no Chainer)"
"$PY" benchmarks/gpu_check.py --sections kernels $QUICK \
    --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
rc_kernels=${PIPESTATUS[0]}
if [ "$rc_kernels" = 3 ] && [ "$DEVICE" = gpu ]; then
    echo "No usable GPU: nothing else to check."
    exit 3
fi

echo "== step 2: Chainer sections"
ENV_PREFIX="${GPU_CHECK_PREFIX:-/tmp/multinode_bn_gpu_check_env}"
if "$PY" -c 'import chainer, chainermn, mpi4py' > /dev/null 2>&1; then
    echo "Chainer is importable as installed."
elif [ -n "$WHEELS" ]; then
    rm -rf "$ENV_PREFIX"
    # --ignore-installed: never uninstall anything of the machine's Python.
    # shellcheck disable=SC2086
    if [ -n "${GPU_CHECK_NO_PIP:-}" ] || ! "$PY" -m pip install --no-index --no-deps --ignore-installed \
            --disable-pip-version-check --find-links "$WHEELS" \
            --prefix "$ENV_PREFIX" $PACKAGES > "$OUT/install.log" 2>&1; then
        echo "pip could not install the wheels (see install.log);" \
             "unpacking them directly."
        "$PY" - "$WHEELS" "$ENV_PREFIX" >> "$OUT/install.log" 2>&1 <<'EOF'
# A minimal wheel installer: purelib/platlib into the prefix's
# site-packages, .data/scripts into bin, .data/data into the prefix.
import glob, os, sys, sysconfig, zipfile
wheels, prefix = sys.argv[1], sys.argv[2]
site = sysconfig.get_path('purelib', vars={'base': prefix, 'platbase': prefix})
for name in ('chainer', 'mpi4py', 'mpich', 'setuptools', 'six', 'filelock',
             'typing_extensions'):
    found = sorted(glob.glob(os.path.join(wheels, name + '-*.whl')))
    if not found:
        print('missing wheel:', name)
        continue
    with zipfile.ZipFile(found[-1]) as z:
        for info in z.infolist():
            parts = info.filename.split('/')
            if parts[0].endswith('.data') and len(parts) > 2:
                kind, rest = parts[1], parts[2:]
                base = {'purelib': site, 'platlib': site,
                        'scripts': os.path.join(prefix, 'bin'),
                        'headers': os.path.join(prefix, 'include'),
                        'data': prefix}[kind]
                dest = os.path.join(base, *rest)
            else:
                dest = os.path.join(site, *parts)
            if info.filename.endswith('/'):
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as src, open(dest, 'wb') as out:
                out.write(src.read())
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest, mode)
    print('unpacked', found[-1])
EOF
    fi
    SITE="$("$PY" -c 'import sys, sysconfig; print(sysconfig.get_path("purelib", vars={"base": sys.argv[1], "platbase": sys.argv[1]}))' "$ENV_PREFIX")"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export LD_LIBRARY_PATH="$ENV_PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PATH="$ENV_PREFIX/bin:$PATH"
    export MPIEXEC="$ENV_PREFIX/bin/mpiexec"
    echo "Overlay: $ENV_PREFIX (site-packages $SITE)"
else
    echo "No wheels folder (--wheels DIR, \$GPU_CHECK_WHEELS, .gpu_wheels):" \
         "the Chainer sections will be reported as SKIP."
fi

# Two processes share the one GPU; MPICH's shared memory is enough.
export MPIR_CVAR_ENABLE_GPU=0
"$PY" benchmarks/gpu_check.py --sections link,mpi,nccl,timing $QUICK \
    --device "$DEVICE" --json "$OUT/chainer.json" 2>&1 | tee "$OUT/chainer.log"
rc_chainer=${PIPESTATUS[0]}

echo "== summary: kernels exit $rc_kernels, Chainer sections exit $rc_chainer"
if [ "$DEVICE" = cpu ] && [ "$rc_kernels" = 3 ]; then
    rc_kernels=0
fi
if [ "$rc_kernels" != 0 ] || [ "$rc_chainer" != 0 ]; then
    exit 1
fi
exit 0
