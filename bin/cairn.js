#!/usr/bin/env node
// The cairn CLI. Graph files are TypeScript, so the tsx loader is registered before anything is imported.
import { EventEmitter } from "node:events";
import { register as registerCjs } from "tsx/cjs/api";
import { register } from "tsx/esm/api";

// LangGraph races every task of a superstep against one abort signal, so a fan-out wider than ten trips
// Node's listener-leak warning; a fan-out of thousands is legitimate here.
EventEmitter.defaultMaxListeners = 10_000;
// Graph files are TypeScript in whatever module system their package uses: hook both loaders.
register();
registerCjs();
const { main } = await import("../src/cli/main.ts");
const code = await main(process.argv.slice(2));
// Let stdout and stderr drain, then exit even if a graph left timers or sockets open.
process.stdout.write("", () => process.stderr.write("", () => process.exit(code)));
