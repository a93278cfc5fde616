#!/usr/bin/env bash
# Install the collectors as systemd services for this checkout (systemd/README.md).
#
#   sudo systemd/install.sh kasa mqtt     system units, run as the checkout's owner
#   systemd/install.sh --user kasa        user units, no root needed
#   sudo systemd/install.sh --uninstall   stop, disable and remove the units
#
# It makes the virtual environment (.venv) and installs requirements.txt into
# it, checks the settings, renders every unit from systemd/electricity.service.in, then
# enables and (re)starts the collectors named. Safe to run again: after a
# `git pull`, a changed config_local.py or a moved checkout, run it again.
#
# Collectors: kasa tuya esp32 mqtt circuit, or all.
# Options:
#   --user           user units (~/.config/systemd/user), for the user running it
#   --uninstall      stop and disable the collectors, remove the units; the
#                    virtual environment and the state dir (spool, names) stay
#   --run-as USER    system units: run the collectors as USER (default: the
#                    owner of the checkout)
#   --state-dir DIR  default: STATE_DIR from the settings (config.py,
#                    config_local.py), ~/.local/state/home-electricity
#   --venv DIR       the virtual environment (default: <checkout>/.venv)
#   --prefix DIR     write the units under DIR and change nothing else (no
#                    virtual environment, no systemctl): to review or package them
# Environment: PYTHON, the interpreter that makes the venv (default python3).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
TEMPLATES="$ROOT/systemd"
ALL_COLLECTORS=(kasa tuya esp32 mqtt circuit)
PYTHON=${PYTHON:-python3}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

fail() {
    echo "install.sh: $*" >&2
    exit 2
}

user_mode=no
uninstall=no
run_as=""
state_dir=""
venv="$ROOT/.venv"
prefix=""
collectors=()
while [ $# -gt 0 ]; do
    case "$1" in
        --user) user_mode=yes ;;
        --uninstall) uninstall=yes ;;
        --run-as) run_as=${2:?--run-as needs a user name}; shift ;;
        --state-dir) state_dir=${2:?--state-dir needs a directory}; shift ;;
        --venv) venv=${2:?--venv needs a directory}; shift ;;
        --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
        -h | --help) usage; exit 0 ;;
        all) collectors=("${ALL_COLLECTORS[@]}") ;;
        -*) fail "unknown option $1 (see --help)" ;;
        *)
            [[ " ${ALL_COLLECTORS[*]} " == *" $1 "* ]] \
                || fail "unknown collector '$1': choose from ${ALL_COLLECTORS[*]} or all"
            [[ " ${collectors[*]:-} " == *" $1 "* ]] || collectors+=("$1")
            ;;
    esac
    shift
done
if [ "$uninstall" = no ] && [ ${#collectors[@]} -eq 0 ]; then
    fail "name the collectors to run: ${ALL_COLLECTORS[*]} (or all); see --help"
fi
[ -z "$prefix" ] || prefix=$(mkdir -p "$prefix" && cd "$prefix" && pwd -P)
# Also accepts a relative --venv (pwd -P would need the directory to exist).
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac

# --- Who runs the collectors, and where things go ---------------------------------

if [ "$user_mode" = yes ]; then
    [ "$(id -u)" -ne 0 ] || [ -n "$prefix" ] \
        || fail "--user installs units for the user running it: run it as that user, without sudo"
    [ -z "$run_as" ] || fail "--run-as is for system units; --user runs as you"
    run_as=$(id -un)
    systemctl=(systemctl --user)
    wanted_by=default.target
else
    [ "$(id -u)" -eq 0 ] || [ -n "$prefix" ] \
        || fail "system units need root: run it with sudo, or use --user for user units"
    run_as=${run_as:-$(stat -c %U "$ROOT")}
    [ "$run_as" != root ] \
        || echo "note: the collectors will run as root (the checkout's owner); --run-as USER" \
            "runs them as another user" >&2
    systemctl=(systemctl)
    wanted_by=multi-user.target
fi
id "$run_as" >/dev/null 2>&1 || fail "no such user: $run_as"
group=$(id -gn "$run_as")
home=$(getent passwd "$run_as" | cut -d: -f6)
if [ "$user_mode" = yes ]; then
    unit_dir="$prefix${XDG_CONFIG_HOME:-$home/.config}/systemd/user"
else
    unit_dir="$prefix/etc/systemd/system"
fi
python="$venv/bin/python"

# Runs a command as the collectors' user (files in their home stay theirs).
as_user() {
    if [ "$(id -un)" = "$run_as" ]; then
        "$@"
    else
        runuser -u "$run_as" -- "$@"
    fi
}

# systemctl, or with --prefix only what would be run.
run_systemctl() {
    if [ -n "$prefix" ]; then
        echo "would run: ${systemctl[*]} $*"
    else
        "${systemctl[@]}" "$@"
    fi
}

# --- Uninstall ------------------------------------------------------------------

if [ "$uninstall" = yes ]; then
    removed=0
    for name in "${ALL_COLLECTORS[@]}"; do
        unit="electricity-$name.service"
        [ -e "$unit_dir/$unit" ] || continue
        run_systemctl disable --now "$unit" || true
        rm -f "$unit_dir/$unit"
        echo "removed $unit_dir/$unit"
        removed=$((removed + 1))
    done
    [ "$removed" -eq 0 ] || run_systemctl daemon-reload
    echo "uninstalled $removed units; kept $venv and the state dir (spool, device names)"
    exit 0
fi

# --- The virtual environment ------------------------------------------------------

if [ -z "$prefix" ]; then
    if [ ! -x "$python" ]; then
        echo "making the virtual environment $venv"
        as_user "$PYTHON" -m venv "$venv" \
            || fail "'$PYTHON -m venv' failed; on Debian or Raspberry Pi OS: sudo apt install python3-venv"
    fi
    # Reinstall only when requirements.txt changed.
    stamp="$venv/.install-requirements.sha256"
    want=$(sha256sum <"$ROOT/requirements.txt" | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "installing requirements.txt into $venv"
        as_user "$python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
        echo "$want" | as_user tee "$stamp" >/dev/null
    fi
    # The checkout on the venv's import path (tools/build_dashboard.py imports settings).
    as_user "$python" -c 'import pathlib, sys, sysconfig
pathlib.Path(sysconfig.get_paths()["purelib"], "electricity.pth").write_text(sys.argv[1] + "\n")' "$ROOT"
    # The service sees the checkout read-only: compile the modules now.
    as_user "$python" -m compileall -q -l "$ROOT" >/dev/null || true
fi

# --- Settings and the state dir ------------------------------------------------------

# A bad setting stops here, not in a restart loop. The settings also give the
# state dir, so runs by hand and the services share names and spool.
check_python=$python
[ -x "$check_python" ] || check_python=$PYTHON
settings_state_dir=$(
    cd "$ROOT" && as_user env HOME="$home" "$check_python" -c '
import sys
import settings
try:
    print(settings.load_settings().state_dir)
except settings.ConfigError as exc:
    sys.exit(f"install.sh: fix the settings first: {exc}")
'
) || exit 2
state_dir=${state_dir:-$settings_state_dir}
case "$state_dir" in /*) ;; *) state_dir="$PWD/$state_dir" ;; esac

# Unit files split on spaces and expand %: keep the paths plain.
for path in "$ROOT" "$venv" "$state_dir"; do
    [[ "$path" =~ ^/[A-Za-z0-9._/+-]*$ ]] \
        || fail "'$path' has characters unit files cannot take (spaces, %, ...): use a plain path"
done

if [ -z "$prefix" ]; then
    # Made by the user where they may; by root (then handed over) elsewhere.
    if ! as_user mkdir -p "$state_dir" 2>/dev/null; then
        [ "$(id -u)" -eq 0 ] || fail "cannot create the state dir $state_dir"
        mkdir -p "$state_dir"
        chown "$run_as:$group" "$state_dir"
    fi
fi

# --- Render the units -----------------------------------------------------------------

# What each collector's unit runs, and what it reads (its Description).
collector_script() {
    case $1 in
        kasa) echo kasa_to_graphite.py ;;
        tuya) echo tuya_to_graphite.py ;;
        esp32) echo esp32_receiver.py ;;
        mqtt) echo mqtt_to_graphite.py ;;
        circuit) echo circuit_to_graphite.py ;;
    esac
}

collector_description() {
    case $1 in
        kasa) echo "TP-Link Kasa plugs and strips" ;;
        tuya) echo "Tuya plugs and meters on the LAN" ;;
        esp32) echo "ESP32 meter pulse reader (HTTP receiver)" ;;
        mqtt) echo "MQTT power sources (Glow, Tasmota, Shelly...)" ;;
        circuit) echo "DIN-rail circuit meters (Modbus, Tuya)" ;;
    esac
}

render() {
    local name=$1 system_lines private_devices=yes
    if [ "$user_mode" = yes ]; then
        system_lines='/^@SYSTEM@/d'
    else
        system_lines='s/^@SYSTEM@//'
    fi
    # Modbus RTU meters hang off a serial adapter.
    [ "$name" != circuit ] || private_devices=no
    sed -e "1i # Rendered by systemd/install.sh from systemd/electricity.service.in: edit that and re-run it." \
        -e '1,/^\[Unit\]/{/^#/d;}' \
        -e "$system_lines" \
        -e "s|@COLLECTOR@|$name|g" \
        -e "s|@SCRIPT@|$(collector_script "$name")|g" \
        -e "s|@DESCRIPTION@|$(collector_description "$name")|g" \
        -e "s|@PRIVATE_DEVICES@|$private_devices|g" \
        -e "s|@ROOT@|$ROOT|g" \
        -e "s|@PYTHON@|$python|g" \
        -e "s|@USER@|$run_as|g" \
        -e "s|@GROUP@|$group|g" \
        -e "s|@STATE_DIR@|$state_dir|g" \
        -e "s|@WANTED_BY@|$wanted_by|g" \
        "$TEMPLATES/electricity.service.in"
}

mkdir -p "$unit_dir"
for name in "${ALL_COLLECTORS[@]}"; do
    unit="electricity-$name.service"
    render "$name" >"$unit_dir/$unit.new"
    chmod 0644 "$unit_dir/$unit.new"
    if cmp -s "$unit_dir/$unit.new" "$unit_dir/$unit"; then
        rm "$unit_dir/$unit.new"
    else
        mv "$unit_dir/$unit.new" "$unit_dir/$unit"
        echo "wrote $unit_dir/$unit"
    fi
done

# Two copies of a collector (a system and a user unit) would fight over the
# state dir's lock: say so.
if [ "$user_mode" = yes ]; then
    other_dir="$prefix/etc/systemd/system"
else
    other_dir="$prefix${XDG_CONFIG_HOME:-$home/.config}/systemd/user"
fi
for name in "${collectors[@]}"; do
    if [ -e "$other_dir/electricity-$name.service" ]; then
        echo "warning: electricity-$name is also installed in $other_dir; remove that" \
            "one (install.sh --uninstall, with or without --user)" >&2
    fi
done

# --- Enable and (re)start -------------------------------------------------------------

units=()
for name in "${collectors[@]}"; do
    units+=("electricity-$name.service")
done
run_systemctl daemon-reload
run_systemctl enable "${units[@]}"
# A restart picks up new code, requirements and settings; the collectors
# finish their cycle and spool what Carbon has not confirmed.
run_systemctl restart "${units[@]}"

if [ "$user_mode" = yes ] && [ -z "$prefix" ]; then
    # Without lingering, user units stop at logout and wait for a login after boot.
    if [ "$(loginctl show-user "$run_as" -p Linger --value 2>/dev/null)" != yes ]; then
        loginctl enable-linger "$run_as" 2>/dev/null \
            || echo "to start them at boot without a login: sudo loginctl enable-linger $run_as" >&2
    fi
fi

journal="journalctl -u"
[ "$user_mode" = no ] || journal="journalctl --user -u"
echo "running: ${units[*]}"
echo "status:  ${systemctl[*]} status ${units[0]}"
echo "logs:    $journal ${units[0]} -f"
