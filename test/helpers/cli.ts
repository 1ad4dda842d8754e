import { execFile, spawn, type ChildProcess } from "node:child_process";
import { mkdir, mkdtemp, rm, symlink } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

/*
 * The `cairn` binary as a user runs it: a child process per command, in a temporary working directory
 * that sees the repository's graphs and fixtures at their usual relative paths.
 */

export const ROOT = fileURLToPath(new URL("../..", import.meta.url));
export const BIN = join(ROOT, "bin", "cairn.js");
const SPAWN_TIMEOUT_MS = 120_000;

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** The environment of a child: no hosted model key, no default store from the caller's shell. */
export function childEnv(env: Record<string, string> = {}): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = { ...process.env, ...env };
  delete out.OPENAI_API_KEY;
  if (!("CAIRN_STORE" in env)) delete out.CAIRN_STORE;
  return out;
}

/** Run `cairn <args>` in `cwd`; resolves with the exit code and output, rejects only if it hangs or cannot start. */
export function cairn(cwd: string, args: string[], env: Record<string, string> = {}, timeoutMs = SPAWN_TIMEOUT_MS): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    execFile(process.execPath, [BIN, ...args], { cwd, env: childEnv(env), timeout: timeoutMs, maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      if (error && typeof error.code !== "number") {
        reject(new Error(`cairn ${args.join(" ")} did not finish (${error.signal ?? error.code}): ${stderr}`));
        return;
      }
      resolve({ code: error ? (error.code as number) : 0, stdout, stderr });
    });
  });
}

/** Start `cairn <args>` and hand back the child, for tests that signal or kill it mid-run. */
export function spawnCairn(cwd: string, args: string[], env: Record<string, string> = {}): { child: ChildProcess; done: Promise<CliResult & { signal: NodeJS.Signals | null }> } {
  const child = spawn(process.execPath, [BIN, ...args], { cwd, env: childEnv(env), stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (d) => (stdout += d));
  child.stderr!.on("data", (d) => (stderr += d));
  const done = new Promise<CliResult & { signal: NodeJS.Signals | null }>((resolve) => {
    child.on("close", (code, signal) => resolve({ code: code ?? -1, signal, stdout, stderr }));
  });
  return { child, done };
}

/** Resolves when the child's stderr has printed a line matching `pattern`. */
export function waitForOutput(child: ChildProcess, pattern: RegExp, timeoutMs = 60_000): Promise<void> {
  return new Promise((resolve, reject) => {
    let seen = "";
    const timer = setTimeout(() => reject(new Error(`no output matching ${pattern} within ${timeoutMs} ms; saw:\n${seen}`)), timeoutMs);
    const onData = (d: Buffer) => {
      seen += d;
      if (pattern.test(seen)) {
        clearTimeout(timer);
        child.stderr!.off("data", onData);
        resolve();
      }
    };
    child.stderr!.on("data", onData);
  });
}

const dirs: string[] = [];

/** A fresh working directory that sees the repo's graphs and test fixtures; removed by `removeWorkdirs`. */
export async function workdir(prefix = "cairn-cli-"): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  dirs.push(dir);
  await symlink(join(ROOT, "graphs"), join(dir, "graphs"));
  await mkdir(join(dir, "test"));
  await symlink(join(ROOT, "test", "fixtures"), join(dir, "test", "fixtures"));
  return dir;
}

export async function removeWorkdirs(): Promise<void> {
  for (const dir of dirs.splice(0)) await rm(dir, { recursive: true, force: true });
}
