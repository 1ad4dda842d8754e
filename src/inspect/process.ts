import { hostname } from "node:os";

/** Whether a process that wrote a checkpoint is still running (only knowable on the same host). */
export function isAlive(pid: number, host: string | undefined): boolean {
  if (host !== undefined && host !== hostname()) return false;
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}
