// Data generation identifiers (as DRBD's generation UUIDs): a source mirror's generation names
// the history its target shares with it (new at mirror add and reset); a mirror volume promoted
// by hand starts a generation of its own, so the two sides can tell on connect whether one of
// them was written apart from the other (split brain).

export function newGeneration(): number {
  // 48 random bits: a safe integer, and collisions between resets of one mirror are negligible.
  return Math.floor(Math.random() * 2 ** 48) + 1;
}
