#!/usr/bin/env python3
"""The Linux installer as a user gets it: installers/build-linux.sh --debug builds
the .deb and .rpm; the .deb is installed with apt-get, its `swarmllm` CLI and
desktop entry checked, the installed app started under Xvfb (run this script
under xvfb-run) and asked for its API, shut down, and the package removed.
Needs root (or sudo) for apt-get; prints SKIPPED without it. Prints
`N passed, N failed`."""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from webdriver import Results, free_port, http, repo_root, target_dir, test_model, wait_for


def sudo():
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def main():
    root = sudo()
    if root is None:
        print("SKIPPED: installing a package needs root or sudo")
        return 0
    r = Results()
    state = {}

    def build():
        subprocess.run([os.path.join(repo_root(), "installers", "build-linux.sh"), "--debug"],
                       check=True, cwd=repo_root())
        debs = glob.glob(os.path.join(target_dir(), "debug", "bundle", "deb", "*.deb"))
        rpms = glob.glob(os.path.join(target_dir(), "debug", "bundle", "rpm", "*.rpm"))
        assert len(debs) == 1 and len(rpms) == 1, (debs, rpms)
        state["deb"] = debs[0]
        state["package"] = subprocess.run(["dpkg-deb", "-f", debs[0], "Package"], check=True,
                                          capture_output=True, text=True).stdout.strip()
        listing = subprocess.run(["dpkg-deb", "-c", debs[0]], check=True, capture_output=True,
                                 text=True).stdout
        files = {line.split()[-1].removeprefix("./") for line in listing.splitlines() if line.strip()}
        assert "usr/bin/swarmllm" in files, sorted(files)
        assert any(f.endswith(".desktop") for f in files), sorted(files)
        assert os.path.getsize(rpms[0]) > 1 << 20, rpms[0]
    r.check("installers/build-linux.sh builds a .deb and an .rpm with the CLI inside", build)

    def install():
        subprocess.run(root + ["apt-get", "install", "-y", "-qq", state["deb"]], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        listed = subprocess.run(["dpkg", "-L", state["package"]], check=True, capture_output=True,
                                text=True).stdout.split()
        apps = [f for f in listed if f.startswith("/usr/bin/") and f != "/usr/bin/swarmllm"]
        desktop = [f for f in listed if f.endswith(".desktop")]
        assert len(apps) == 1 and desktop, listed
        state["app"] = apps[0]
        with open(desktop[0]) as f:
            entry = f.read()
        assert f"Exec={os.path.basename(apps[0])}" in entry and "Name=SwarmLLM" in entry, entry
        out = subprocess.run(["/usr/bin/swarmllm", "--version"], check=True, capture_output=True,
                             text=True).stdout
        assert out.startswith("swarmllm "), out
    r.check("apt-get installs it: the app, the swarmllm CLI and a desktop entry", install)

    def run_installed():
        data = tempfile.mkdtemp(prefix="swarmllm-installed-")
        port = free_port()
        env = {**os.environ, "SWARMLLM_DATA_DIR": data, "SWARMLLM_API_PORT": str(port),
               "SWARMLLM_P2P_HOST": "127.0.0.1", "SWARMLLM_P2P_PORT": str(free_port()),
               "SWARMLLM_MDNS": "false", "SWARMLLM_SECRET_STORE": "file", "SWARMLLM_THREADS": "1",
               "SWARMLLM_MODEL": test_model()}
        env.pop("SWARMLLM_API_KEY", None)
        app = subprocess.Popen([state["app"]], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for("the installed app's API", lambda: http("GET", f"{base}/health/live")[0] == 200,
                     timeout=120)
            status, v = http("GET", f"{base}/v1/models")
            assert status == 200 and v["data"][0]["id"] == "smollm2-135m-instruct.q4_1", v
            # The installed CLI drives the installed app's node.
            key = subprocess.run(["/usr/bin/swarmllm", "--data-dir", data, "--api-port", str(port),
                                  "api-key"], check=True, capture_output=True, text=True).stdout.strip()
            status, _ = http("POST", f"{base}/api/admin/shutdown", {},
                             headers={"Authorization": f"Bearer {key}"})
            assert status == 200
            app.wait(timeout=60)
        finally:
            if app.poll() is None:
                app.kill()
            shutil.rmtree(data, ignore_errors=True)
    r.check("the installed app starts, serves the API and shuts down", run_installed)

    def remove():
        subprocess.run(root + ["apt-get", "remove", "-y", "-qq", state["package"]], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        assert not os.path.exists("/usr/bin/swarmllm") and not os.path.exists(state["app"])
    r.check("apt-get removes it", remove)
    return r.summary()


if __name__ == "__main__":
    sys.exit(main())
