# Same path inside the builder container and inside the image chroot.
export LABFORGE_CHROOT_CA=/usr/local/share/labforge/build-ca.crt
if [ -n "${LABFORGE_BUILD_CA:-}" ]; then
    export PIP_CERT=$LABFORGE_CHROOT_CA
    export REQUESTS_CA_BUNDLE=$LABFORGE_CHROOT_CA
fi
# pip-cache bind-mounts $DIB_IMAGE_CACHE/pip on /tmp/pip in the chroot.
export PIP_CACHE_DIR=/tmp/pip
