#!/usr/bin/env node
// The cairn CLI. Graph files are TypeScript, so the tsx loader is registered before anything is imported.
import { register } from "tsx/esm/api";

register();
const { main } = await import("../src/cli/main.ts");
const code = await main(process.argv.slice(2));
// Let stdout and stderr drain, then exit even if a graph left timers or sockets open.
process.stdout.write("", () => process.stderr.write("", () => process.exit(code)));
