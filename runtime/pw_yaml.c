/* pw_yaml: see pw_yaml.h. */
#include "pw_yaml.h"

#include <stdbool.h>
#include <stddef.h>

const char *pw_yaml_refusal(const yaml_event_t *ev)
{
    const yaml_char_t *anchor = NULL, *tag = NULL;
    bool implicit = true;
    switch (ev->type) {
    case YAML_ALIAS_EVENT:
        return "YAML aliases are not allowed";
    case YAML_SCALAR_EVENT:
        anchor = ev->data.scalar.anchor;
        tag = ev->data.scalar.tag;
        implicit = ev->data.scalar.plain_implicit || ev->data.scalar.quoted_implicit;
        break;
    case YAML_SEQUENCE_START_EVENT:
        anchor = ev->data.sequence_start.anchor;
        tag = ev->data.sequence_start.tag;
        implicit = ev->data.sequence_start.implicit;
        break;
    case YAML_MAPPING_START_EVENT:
        anchor = ev->data.mapping_start.anchor;
        tag = ev->data.mapping_start.tag;
        implicit = ev->data.mapping_start.implicit;
        break;
    default:
        return NULL;
    }
    if (anchor)
        return "YAML anchors are not allowed";
    if (tag && !implicit)
        return "YAML tags are not allowed";
    return NULL;
}
