/*
 * pw_yaml: what parkway's YAML readers (function specs, scaler offers) refuse in an event
 * stream, in one place. Configs are plain data: aliases and anchors (which can expand a
 * small file into a huge tree) and explicit tags (`!!python/object` and friends) are
 * errors wherever they appear.
 */
#ifndef PW_YAML_H
#define PW_YAML_H

#include <yaml.h>

/*
 * NULL when ev may appear in a parkway config, else the message that refuses it ("YAML
 * aliases are not allowed", "YAML anchors are not allowed", "YAML tags are not allowed";
 * static strings). Events other than alias, scalar, sequence and mapping starts are
 * allowed here; their place in the stream is the reader's business.
 */
const char *pw_yaml_refusal(const yaml_event_t *ev);

#endif
