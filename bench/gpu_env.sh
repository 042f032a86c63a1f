# Source this at the start of a command on a lent GPU machine (the `device` tool), from the repo root,
# with `.gl` and `.whl` carried:  source bench/gpu_env.sh
# It unpacks the EGL/GL loaders (headless moderngl) and installs the wheels the image lacks
# (diffusers, PyAV, moderngl, trimesh, ftfy) into /tmp/site, then puts src/ on the path.
# The copy of the tree sent there may lack .git: every bench script records $EX4D_COMMIT when it is set
# (export EX4D_COMMIT=$(git rev-parse --short HEAD) here, and pass it in the command).
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
