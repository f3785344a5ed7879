"""Load a UI-format workflow in a running ComfyUI's own frontend (headless Chromium, DevTools protocol)
and print, as JSON, the node types the frontend does not know and the API prompt the frontend makes of it
(app.graphToPrompt). Run with an interpreter that has aiohttp (ComfyUI's own).

    python frontend_check.py http://127.0.0.1:8188 workflow.json [chromium]
"""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import aiohttp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def check(url: str, workflow: str, chromium: str) -> dict:
    port = _free_port()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                 f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            devtools = f"http://127.0.0.1:{port}"
            for _ in range(120):
                try:
                    urllib.request.urlopen(devtools + "/json/version", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            req = urllib.request.Request(f"{devtools}/json/new?{url}/", method="PUT")
            target = json.loads(urllib.request.urlopen(req, timeout=10).read())
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    counter = [0]

                    async def evaluate(expr: str):
                        counter[0] += 1
                        await ws.send_json({"id": counter[0], "method": "Runtime.evaluate", "params": {
                            "expression": expr, "awaitPromise": True, "returnByValue": True}})
                        while True:
                            msg = json.loads((await ws.receive(timeout=60)).data)
                            if msg.get("id") == counter[0]:
                                res = msg["result"]
                                if "exceptionDetails" in res:
                                    raise RuntimeError(json.dumps(res["exceptionDetails"])[:2000])
                                return res["result"].get("value")

                    ready = ("!!(window.app && window.app.graph && window.LiteGraph && "
                             "Object.keys(LiteGraph.registered_node_types).length > 100)")
                    for _ in range(240):
                        if await evaluate(ready):
                            break
                        await asyncio.sleep(0.5)
                    else:
                        raise RuntimeError("the ComfyUI frontend did not come up in 120 s")
                    await evaluate(f"app.loadGraphData({json.dumps(json.load(open(workflow)))}).then(() => true)")
                    await asyncio.sleep(1.0)
                    missing = json.loads(await evaluate(
                        "JSON.stringify(app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type])"
                        ".map(n => n.type))"))
                    prompt = json.loads(await evaluate("app.graphToPrompt().then(p => JSON.stringify(p.output))"))
                    return {"missing": missing, "prompt": prompt}
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    result = asyncio.run(check(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "chromium"))
    print(json.dumps(result))
