import { readFile } from "node:fs/promises";
import { parseDocument } from "yaml";
import { CairnError } from "../errors.ts";

/**
 * Read a workflow input from a JSON or YAML file (by extension: `.yaml`/`.yml` is YAML, anything else
 * JSON). A resume re-reads the file a thread was started from, to tell whether the input changed.
 *
 * @throws CairnError INVALID_ARGUMENT naming the file when it cannot be read or parsed.
 * @example
 * ```ts
 * const input = await readInputFile("story.yaml");
 * await run(moralVideo, { input, inputSource: "file:/abs/story.yaml" });
 * ```
 */
export async function readInputFile(file: string, shown = file): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch {
    throw new CairnError("INVALID_ARGUMENT", `Input file "${shown}" cannot be read. Pass an existing JSON or YAML file: --input @story.json`, { file: shown });
  }
  if (/\.ya?ml$/i.test(file)) {
    const doc = parseDocument(text, { prettyErrors: true });
    if (doc.errors.length) throw new CairnError("INVALID_ARGUMENT", `Input file "${shown}" is not valid YAML: ${doc.errors[0]!.message}`, { file: shown });
    return doc.toJS();
  }
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new CairnError("INVALID_ARGUMENT", `Input file "${shown}" is not valid JSON (${(error as Error).message}). Fix the file, or pass YAML with a .yaml name.`, { file: shown });
  }
}
