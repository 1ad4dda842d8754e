import { resolve } from "node:path";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { CairnError, readInputFile } from "../index.ts";

/** Flags every command accepts. */
export const COMMON_OPTIONS = {
  store: { type: "string" },
  json: { type: "boolean", default: false },
  verbose: { type: "boolean", default: false },
  help: { type: "boolean", short: "h", default: false },
} as const satisfies ParseArgsConfig["options"];

/** Flags of the commands that run steps. */
export const RUN_OPTIONS = {
  "budget-usd": { type: "string" },
} as const satisfies ParseArgsConfig["options"];

/** `--budget-usd 2.50` as a number; a usage error for anything that is not an amount. */
export function budgetOption(raw: string | undefined): number | undefined {
  if (raw === undefined) return undefined;
  const value = Number(raw.replace(/^\$/, ""));
  if (raw.trim() === "" || !Number.isFinite(value) || value <= 0) {
    throw new CairnError("INVALID_ARGUMENT", `--budget-usd ${JSON.stringify(raw)} is not an amount of dollars. Pass a number above 0, e.g. --budget-usd 2.50`);
  }
  return value;
}

/** parseArgs with its errors turned into one-line usage errors that name the command's help. */
export function parse<O extends NonNullable<ParseArgsConfig["options"]>>(command: string, argv: string[], options: O) {
  try {
    return parseArgs({ args: argv, options, allowPositionals: true, strict: true });
  } catch (error) {
    const message = (error as Error).message.replace(/\. To specify a positional argument.*$/s, "");
    throw new CairnError("INVALID_ARGUMENT", `${message}. See: cairn ${command} --help`);
  }
}

/**
 * `--input '<json>'`, `--input @file.json` or `--input @file.yaml`, parsed, with where it came from
 * (`file:<absolute path>` for a file, so a resume can re-read it); undefined when absent.
 */
export async function readInput(raw: string | undefined, cwd: string): Promise<{ value: unknown; source: string } | undefined> {
  if (raw === undefined) return undefined;
  if (raw.startsWith("@")) {
    const file = raw.slice(1);
    const path = resolve(cwd, file);
    return { value: await readInputFile(path, file), source: `file:${path}` };
  }
  try {
    return { value: JSON.parse(raw), source: "given" };
  } catch (error) {
    throw new CairnError(
      "INVALID_ARGUMENT",
      `--input is not valid JSON (${(error as Error).message}). Pass a JSON object, e.g. --input '{"topic":"honesty"}', or a file: --input @input.json`,
    );
  }
}

/** Exactly one positional argument, or a usage error naming what is missing. */
export function onePositional(command: string, positionals: string[], what: string): string {
  if (positionals.length === 0) throw new CairnError("INVALID_ARGUMENT", `cairn ${command} needs ${what}. See: cairn ${command} --help`);
  if (positionals.length > 1) {
    throw new CairnError("INVALID_ARGUMENT", `cairn ${command} takes one ${what}, got ${positionals.length}: ${positionals.join(" ")}. See: cairn ${command} --help`);
  }
  return positionals[0]!;
}
