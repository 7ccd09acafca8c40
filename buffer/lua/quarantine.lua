-- Move a claimed entry that failed to decode to the quarantine list, with the reason.
-- ARGV: id, token, reason. Returns 1 when quarantined, 0 when the claim was not ours.
local id, token, reason = ARGV[1], ARGV[2], ARGV[3]
local mine = release_claims(token, {id})
if #mine == 0 then return 0 end
local payload = redis.call('GET', payload_key(id)) or ''
remove_entries({id})
redis.call('RPUSH', K_QUARANTINE, cmsgpack.pack({id = id, reason = reason, at_ms = now_ms(), payload = payload}))
redis.call('HINCRBY', K_COUNTERS, 'quarantined', 1)
release_admission(1)
return 1
