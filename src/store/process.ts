import { hostname } from "node:os";

/**
 * Whether a process that wrote a checkpoint or holds a lock is still running. Only knowable on its own
 * host: for another host the answer is "unknown" (a lock is then never taken over).
 */
export function processState(pid: number, host: string | undefined): "alive" | "dead" | "unknown" {
  if (host !== undefined && host !== hostname()) return "unknown";
  try {
    process.kill(pid, 0);
    return "alive";
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM" ? "alive" : "dead";
  }
}
