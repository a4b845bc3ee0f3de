-- KEYS[1] epoch, KEYS[2] epoch birth; ARGV[1] epoch candidate
return ensure_epoch(KEYS[1], KEYS[2], ARGV[1])
