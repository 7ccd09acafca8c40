-- Move a claimed entry that failed to decode, or that the learner could not train on
-- (a non-finite loss or gradient), to the quarantine list, with the reason.
-- ARGV: id, token, reason, producer ('' when not known). Returns 1 when quarantined, 0
-- when the claim was not ours.
local id, token, reason, producer = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local mine = release_claims(token, {id})
if #mine == 0 then return 0 end
quarantine_entry(id, reason, producer)
return 1
