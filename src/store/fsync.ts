import { open } from "node:fs/promises";

/** Make a folder's entries durable (a created, renamed or removed file): fsync the folder itself. */
export async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
