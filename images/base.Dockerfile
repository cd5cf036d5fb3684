# A Python 3.11 base image built with no registry at all (`make base-image`): a debootstrap rootfs
# imported as ROOTFS_IMAGE, Debian's python3 and venv, and the extra CA certificates of the build network.
ARG ROOTFS_IMAGE
FROM ${ROOTFS_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
# After the apt installs: ca-certificates would otherwise rebuild the store without them.
COPY ca-certificates/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
# pip and requests carry their own CA bundle; point them at the system store that now holds the extra CAs.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
