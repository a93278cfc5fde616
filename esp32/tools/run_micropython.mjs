// Run Python code under real MicroPython (its WebAssembly port) in Node, so the
// firmware's pure logic is checked by the interpreter it ships to, off-device.
//
//   npm ci --prefix esp32/tools
//   node esp32/tools/run_micropython.mjs esp32/pulse_logic.py -c "import pulse_logic; pulse_logic.self_check()"
//
// Each .py file given is copied to the interpreter's root, which is on sys.path.
// Exit status: 0 on success, 1 if the code raised (traceback on stderr), 2 on usage.
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";

const args = process.argv.slice(2);
const codeAt = args.indexOf("-c");
if (codeAt < 0 || codeAt !== args.length - 2) {
  process.stderr.write("usage: run_micropython.mjs [FILE.py ...] -c CODE\n");
  process.exit(2);
}
const code = args[codeAt + 1];
const files = args.slice(0, codeAt);

const mp = await loadMicroPython({
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stderr.write(line + "\n"),
});
for (const file of files) {
  mp.FS.writeFile("/" + basename(file), readFileSync(file));
}
try {
  mp.runPython("import sys\nif '/' not in sys.path:\n    sys.path.append('/')\n");
  mp.runPython(code);
} catch (error) {
  process.stderr.write(String(error.message || error) + "\n");
  process.exit(1);
}
process.exit(0);
