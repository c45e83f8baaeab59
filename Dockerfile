# harness: DeepSpeed training for Hugging Face models, on a CUDA PyTorch image.
#
#   docker build -t harness .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/workspace/runs" harness show examples/tiny-cpu.yaml
#   docker run --gpus all --ipc=host -v "$PWD/runs:/workspace/runs" harness train examples/gpt2-124m-1x8.yaml
#
# Multi-node (pdsh launcher): every node runs this image with sshd as root on a shared port, e.g.
#   docker run --gpus all --network=host --ipc=host --user root harness-image /usr/sbin/sshd -D -p 2222
# (the entrypoint is overridden with --entrypoint /usr/sbin/sshd; keys and authorized_keys are mounted).

# The devel flavour carries nvcc: DeepSpeed builds its fused Adam and other ops just in time.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel

# pdsh and the ssh client: DeepSpeed's multi-node launcher fans out over them; procps for the pkill its
# runner sends to every host on interrupt; libaio for NVMe offload. sshd for the other
# side. Versions come with the pinned base image's Ubuntu release rather than apt pins, which break
# on every point release of the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends pdsh openssh-client openssh-server procps libaio-dev \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /run/sshd

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PDSH_RCMD_TYPE=ssh \
    HF_HOME=/workspace/.cache/huggingface \
    TORCH_EXTENSIONS_DIR=/workspace/.cache/torch_extensions

WORKDIR /opt/harness
# Only what the package needs, so an edit to tests or docs does not rebuild the install layer.
COPY pyproject.toml README.md ./
COPY harness ./harness
# torch is already in the base image and satisfies the requirement; pip installs the rest.
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 harness \
    && mkdir -p /workspace/.cache \
    && chown -R harness:harness /workspace

COPY --chown=harness:harness examples /workspace/examples
COPY --chown=harness:harness ds_configs /workspace/ds_configs

# Single-node training needs no root (uid 1000 is the harness user; numeric, so hosts resolve it);
# multi-node sshd is started with --user root (see above).
USER 1000:1000
WORKDIR /workspace
ENTRYPOINT ["harness"]
CMD ["--help"]
