import { createInterface } from "node:readline/promises";
import { createLogUpdate } from "log-update";
import { isCairnError, USAGE_ERROR_CODES } from "../index.ts";
import { artifactsCommand, usage as artifactsUsage } from "./artifacts.ts";
import { diffCommand, usage as diffUsage } from "./diff.ts";
import { exportCommand, usage as exportUsage } from "./export.ts";
import { graphCommand, usage as graphUsage } from "./graph.ts";
import { historyCommand, usage as historyUsage } from "./history.ts";
import { importCommand, usage as importUsage } from "./import.ts";
import { inspectCommand, usage as inspectUsage } from "./inspect.ts";
import { pruneCommand, usage as pruneUsage } from "./prune.ts";
import type { Io } from "./render.ts";
import { resumeCommand, usage as resumeUsage } from "./resume.ts";
import { rmCommand, usage as rmUsage } from "./rm.ts";
import { runCommand, usage as runUsage } from "./run.ts";
import { threadsCommand, usage as threadsUsage } from "./threads.ts";
import { unlockCommand, usage as unlockUsage } from "./unlock.ts";
import { verifyCommand, usage as verifyUsage } from "./verify.ts";

const COMMANDS: Record<string, (argv: string[], io: Io) => Promise<number>> = {
  run: runCommand,
  resume: resumeCommand,
  threads: threadsCommand,
  history: historyCommand,
  inspect: inspectCommand,
  artifacts: artifactsCommand,
  diff: diffCommand,
  export: exportCommand,
  import: importCommand,
  graph: graphCommand,
  rm: rmCommand,
  prune: pruneCommand,
  verify: verifyCommand,
  unlock: unlockCommand,
};

const HELP = `cairn — durable checkpoints, resume and restart-from-step for long AI generation pipelines

Commands:
${[runUsage, resumeUsage, threadsUsage, historyUsage, inspectUsage, artifactsUsage, diffUsage, graphUsage, exportUsage, importUsage, rmUsage, pruneUsage, verifyUsage, unlockUsage].map((u) => `  ${u.split("\n")[0]}`).join("\n")}

Every command takes --store <uri> (file:<dir>, sqlite:<path>, postgres://…; default $CAIRN_STORE or file:.cairn),
--json, --verbose (stack traces) and --help.`;

/** Run the CLI; returns the exit code: 0 ok, 1 a step or the store failed, 2 bad input (nothing written). */
export async function main(argv: string[], io: Io = defaultIo()): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === "--help" || command === "-h" || command === "help") {
    io.out(HELP);
    return command === undefined ? 2 : 0;
  }
  const handler = COMMANDS[command];
  if (!handler) {
    io.err(`cairn: unknown command "${command}". Commands: ${Object.keys(COMMANDS).join(", ")}. See: cairn --help`);
    return 2;
  }
  try {
    return await handler(rest, io);
  } catch (error) {
    const verbose = rest.includes("--verbose");
    if (isCairnError(error)) {
      io.err(`cairn: ${error.message}`);
      if (verbose && error.stack) io.err(error.stack);
      return USAGE_ERROR_CODES.has(error.code) ? 2 : 1;
    }
    const message = error instanceof Error ? error.message : String(error);
    io.err(`cairn: unexpected error: ${message}${verbose ? "" : " (run with --verbose for the stack trace)"}`);
    if (verbose && error instanceof Error && error.stack) io.err(error.stack);
    return 1;
  }
}

function defaultIo(): Io {
  // A reader that stops early (`cairn history t | head`) closes the pipe: what is left to print has no
  // reader, and that is not an error of the command.
  process.stdout.on("error", (error: NodeJS.ErrnoException) => {
    if (error.code !== "EPIPE") throw error;
  });
  const io: Io = { out: (t) => process.stdout.write(`${t}\n`), err: (t) => process.stderr.write(`${t}\n`) };
  if (process.stdin.isTTY && process.stderr.isTTY) {
    io.ask = async (question) => {
      const prompt = createInterface({ input: process.stdin, output: process.stderr });
      try {
        return await prompt.question(question);
      } finally {
        prompt.close();
      }
    };
  }
  if (process.stderr.isTTY && !process.env.CI) {
    const live = createLogUpdate(process.stderr);
    io.live = { update: (text) => live(text), clear: () => live.clear() };
  }
  return io;
}
