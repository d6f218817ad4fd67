#!/usr/bin/env bash
# bootstrap.sh -- the Debian packages the gateway itself needs on a bare
# Debian 12 (the testbed scripts install their own).
source "$(dirname "${BASH_SOURCE[0]}")/testbed/lib.sh"
require_root
apt_install python3 python3-venv python3-pip python3-dev gcc make curl ca-certificates git
# image builds write each environment layer with mksquashfs (gateway/adapters/apptainer.py)
apt_install squashfs-tools
# the page tests drive Debian's chromium through chromedriver
apt_install chromium chromium-driver
# tests/test_systemd.py: systemd-analyze verify of deploy/systemd (no systemd as PID 1 needed)
apt_install systemd
# nginx in front (deploy/nginx/m2d.conf); the tests run a private instance of it
# (its own prefix, ports and pid) with a certificate openssl makes
apt_install nginx-light openssl
