/**
 * File names for thread ids and step files. Thread ids are arbitrary strings; folder names keep
 * `[A-Za-z0-9_-]` as they are and write every other UTF-8 byte as `%HH`, so every id maps to exactly one
 * safe name (no `/`, no `..`, no leading dot) and back.
 */
export function encodeThreadDir(thread: string): string {
  let out = "";
  for (const byte of Buffer.from(thread, "utf8")) {
    const c = String.fromCharCode(byte);
    out += /[A-Za-z0-9_-]/.test(c) ? c : `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

export function decodeThreadDir(name: string): string | undefined {
  if (!/^([A-Za-z0-9_-]|%[0-9A-F]{2})+$/.test(name)) return undefined;
  const bytes: number[] = [];
  for (let i = 0; i < name.length; i += 1) {
    if (name[i] === "%") {
      bytes.push(parseInt(name.slice(i + 1, i + 3), 16));
      i += 2;
    } else bytes.push(name.charCodeAt(i));
  }
  return Buffer.from(bytes).toString("utf8");
}

/** `0003-story_generator.json`: the order of the checkpoint in its thread, then the step name. */
export function stepFileName(order: number, step: string): string {
  const safe = step.replace(/[^A-Za-z0-9_.+-]/g, "_").slice(0, 80) || "step";
  return `${String(order).padStart(4, "0")}-${safe}.json`;
}
